"""Role pools: actors placed with Ray placement groups, and waiting on them with clear errors.

A role (generator, reward, reference, learner) is a pool of actors of one class. Each
pool gets a placement group (one bundle per actor); if the cluster cannot place every
pool within ``placement_timeout_s``, the error lists what was asked and what each node has.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlalign_ray.config import Placement, Resources
from rlalign_ray.errors import ActorFailure, PlacementError, RlalignError
from rlalign_ray.runtime.cluster import describe_cluster, worker_env


@dataclass
class RoleSpec:
    """How many actors of which class a role runs, what each needs, where they go."""

    name: str
    cls: type
    num_actors: int
    resources: Resources
    args: Callable[[int], tuple] = lambda i: ()  # constructor args for actor i
    placement: Placement = field(default_factory=Placement)
    # Ray concurrency groups of each actor (name -> threads): methods called in one run
    # beside the default group's (generators' weight loads with in-flight updates)
    concurrency_groups: dict[str, int] = field(default_factory=dict)


@dataclass
class Slot:
    """Where actor ``i`` of a role goes: a placement group and a bundle in it."""

    group: Any
    bundle: int


@dataclass
class RolePool:
    spec: RoleSpec
    actors: list[Any] = field(default_factory=list)
    placement_group: Any = None  # this role's own group (None when colocated)
    slots: list[Slot] = field(default_factory=list)  # actor i's bundle (to replace it there)

    @property
    def name(self) -> str:
        return self.spec.name


def plan_bundles(specs: Sequence[RoleSpec]) -> dict[str, list[dict[str, float]]]:
    """Bundles per role that owns a placement group. A colocated role's actor j shares
    bundle ``j % n`` of its host, which is sized for both."""
    plan = {
        s.name: [s.resources.bundle() for _ in range(s.num_actors)]
        for s in specs
        if not s.placement.colocate_with
    }
    for s in specs:
        host = s.placement.colocate_with
        if host:
            for j in range(s.num_actors):
                b = plan[host][j % len(plan[host])]
                for k, v in s.resources.bundle().items():
                    b[k] = b.get(k, 0.0) + v
    return plan


def place(specs: Sequence[RoleSpec], timeout_s: float) -> dict[str, list[Slot]]:
    """Placement groups for every role (colocated roles share their host's); wait for all,
    or fail naming what cannot fit."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    plan = plan_bundles(specs)
    by_name = {s.name: s for s in specs}
    groups = {}
    for name, bundles in plan.items():
        p = by_name[name].placement
        labels = [dict(p.node_labels)] * len(bundles) if p.node_labels else None
        groups[name] = placement_group(
            bundles, strategy=p.strategy, name=f"rlalign-{name}", bundle_label_selector=labels
        )
    ready, _ = ray.wait(
        [g.ready() for g in groups.values()], num_returns=len(groups), timeout=timeout_s
    )
    if len(ready) < len(groups):
        pending = [n for n, g in groups.items() if not _is_ready(g)]
        for g in groups.values():
            remove_placement_group(g)
        raise PlacementError(_unplaceable(specs, plan, pending, timeout_s))
    slots = {}
    for s in specs:
        host = s.placement.colocate_with or s.name
        n = len(plan[host])
        slots[s.name] = [Slot(groups[host], j % n) for j in range(s.num_actors)]
    return slots


def _unplaceable(specs, plan, pending, timeout_s) -> str:
    lines = []
    for name, bundles in plan.items():
        spec = next(s for s in specs if s.name == name)
        guests = [s.name for s in specs if s.placement.colocate_with == name]
        with_ = f" (shared with {', '.join(guests)})" if guests else ""
        labels = f", node labels {spec.placement.node_labels}" if spec.placement.node_labels else ""
        lines.append(
            f"  {name}{with_}: {len(bundles)} bundles {bundles}, {spec.placement.strategy}{labels}"
        )
    return (
        f"the cluster cannot place {', '.join(pending)} within {timeout_s:g}s "
        f"(run.placement_timeout_s).\nAsked for:\n"
        + "\n".join(lines)
        + f"\nThe cluster has:\n{describe_cluster()}\n"
        "Lower the per-role resources or actor counts, or add nodes with those resources."
    )


def _is_ready(group: Any) -> bool:
    import ray

    ready, _ = ray.wait([group.ready()], timeout=0)
    return bool(ready)


def start_pools(specs: Sequence[RoleSpec], timeout_s: float) -> dict[str, RolePool]:
    """Place every role, then start its actors in their bundles."""
    slots = place(specs, timeout_s)
    pools: dict[str, RolePool] = {}
    for spec in specs:
        own = None if spec.placement.colocate_with else slots[spec.name][0].group
        pool = RolePool(spec=spec, placement_group=own, slots=slots[spec.name])
        for i, slot in enumerate(slots[spec.name]):
            pool.actors.append(make_actor(spec, slot, i))
        pools[spec.name] = pool
    return pools


def make_actor(spec: RoleSpec, slot: Slot, i: int) -> Any:
    """Actor ``i`` of ``spec`` in ``slot`` (also how a dead actor's replacement starts). A
    class with ``rlalign_start_actor`` starts its own (``bench/hosted.py``: simulated
    actors, many to a process)."""
    import ray

    own = getattr(spec.cls, "rlalign_start_actor", None)
    if own is not None:
        return own(spec, slot, i)
    groups = spec.concurrency_groups  # only the class decorator takes them
    cls = ray.remote(concurrency_groups=groups)(spec.cls) if groups else ray.remote(spec.cls)
    return cls.options(**actor_options(spec, slot)).remote(*spec.args(i))


def actor_options(spec: RoleSpec, slot: Slot) -> dict[str, Any]:
    """The Ray options of ``spec``'s actors in ``slot``: resources, bundle, environment."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        **spec.resources.ray_options(),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            slot.group, placement_group_bundle_index=slot.bundle
        ),
        "runtime_env": {"env_vars": worker_env(cpu_only=spec.resources.num_gpus == 0)},
    }


def kill(actor: Any) -> None:
    """``ray.kill(actor, no_restart=True)``; a handle that is not a Ray actor's
    (``bench/hosted.py``) kills itself."""
    import ray

    if isinstance(actor, ray.actor.ActorHandle):
        ray.kill(actor, no_restart=True)
    else:
        actor.kill()


def slot_node(slot: Slot) -> str:
    """The address of the node holding ``slot``'s bundle (even when its actor is dead)."""
    import ray
    from ray.util.placement_group import placement_group_table

    try:
        node = placement_group_table(slot.group)["bundles_to_node_id"][slot.bundle]
        return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)
    except Exception:  # a removed group or a lost node: the address is unknown
        return "an unknown node"


def wait_placed(slot: Slot, timeout_s: float) -> bool:
    """Wait until ``slot``'s bundle is on a live node (Ray places the bundles of a lost node
    again where there is room); False if it is not by ``timeout_s``."""
    import ray
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            node = placement_group_table(slot.group)["bundles_to_node_id"].get(slot.bundle)
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        except Exception:  # a removed group: let the actor's own start report it
            return True
        if node in alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def actor_died(ref: Any) -> bool:
    """Whether a finished ref failed because its actor died (or became unreachable)."""
    import ray
    from ray.exceptions import RayActorError

    try:
        ray.get(ref, timeout=0)
    except RayActorError:
        return True
    except Exception:
        return False
    return False


def lost_roles(pools: dict[str, RolePool], timeout_s: float = 10.0) -> str:
    """Which roles lost actors, and which nodes are gone: for the message of a failed step.

    Every actor is pinged at once and all answers are awaited together for ``timeout_s``
    in all (seconds, not one timeout per actor); an actor that does not answer in time is
    reported as not responding, one that died as lost."""
    import ray
    from ray.exceptions import RayActorError

    pings = {name: [a.ping.remote() for a in pool.actors] for name, pool in pools.items()}
    every = [ref for refs in pings.values() for ref in refs]
    done, _ = ray.wait(every, num_returns=len(every), timeout=timeout_s) if every else ([], [])
    answered = set(done)
    lost, silent = [], []
    for name, refs in pings.items():
        dead = hung = 0
        for ref in refs:
            if ref not in answered:
                hung += 1
                continue
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                dead += 1
            except Exception:  # a failing actor still counts as alive here
                pass
        if dead:
            lost.append(f"{name} ({dead} of {len(refs)} actors)")
        if hung:
            silent.append(f"{name} ({hung} of {len(refs)} actors)")
    gone = [n["NodeManagerAddress"] + " " + n["NodeID"][:8] for n in ray.nodes() if not n["Alive"]]
    text = "Roles that lost actors: " + (", ".join(lost) if lost else "none")
    if silent:
        text += f". Not answering within {timeout_s:g}s: " + ", ".join(silent)
    if gone:
        text += ". Nodes no longer alive: " + ", ".join(gone)
    return text


class Future:
    """Calls in flight (their refs) and how to turn their results into one value.

    ``finish`` maps the refs' values to the result; ``fetch`` replaces the plain wait on
    the refs (for callers that label each ref in their errors)."""

    def __init__(
        self,
        refs: Sequence[Any],
        what: str,
        finish: Callable[[Any], Any] | None = None,
        fetch: Callable[[], Any] | None = None,
    ):
        self.refs, self.what = list(refs), what
        self._finish = finish or (lambda values: values)
        self._fetch = fetch
        self._value: Any = None
        self._done = False

    def ready(self) -> bool:
        import ray

        if not self.refs:
            return True
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(done) == len(self.refs)

    def resolve(self, value: Any) -> None:
        """Settle the future with ``value`` without waiting on its refs (they were
        replaced: a weight sync redone after a generator died)."""
        self._value, self._done = value, True

    def result(self, timeout_s: float | None = None) -> Any:
        if not self._done:
            values = self._fetch() if self._fetch else get(self.refs, self.what, timeout_s)
            self._value = self._finish(values)
            self._done = True
        return self._value


def get(refs: Any, what: str, timeout_s: float | None = None) -> Any:
    """``ray.get`` that turns actor deaths, task errors and time-outs into one clear error."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    start = time.monotonic()
    try:
        return ray.get(refs, timeout=timeout_s)
    except RayActorError as e:
        if e.actor_init_failed:
            raise _init_failure(what, str(e)) from None
        raise ActorFailure(
            f"{what}: an actor died ({_first_line(e)}). The run stops here; "
            "check the actor's log above for the cause (out of memory, a lost "
            "node, a crash)."
        ) from None
    except RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, RlalignError):
            cause.args = (f"{what}: {cause}",)
            raise cause from None
        raise ActorFailure(
            f"{what} failed: {type(cause).__name__ if cause else 'error'}: "
            f"{cause if cause else _first_line(e)}\n{e}"
        ) from None
    except GetTimeoutError:
        waited = time.monotonic() - start
        raise ActorFailure(
            f"{what} did not finish within {waited:.0f}s (run.call_timeout_s)"
        ) from None


def _init_failure(what: str, message: str) -> RlalignError:
    """The error that made an actor's constructor fail, re-raised as our own type."""
    from rlalign_ray import errors

    found = re.findall(r"rlalign_ray\.errors\.(\w+): (.*)", message)
    if found:
        name, text = found[-1]
        cls = getattr(errors, name, errors.ActorFailure)
        if issubclass(cls, RlalignError) and cls is not errors.ConfigError:
            return cls(f"{what}: {text}")
    last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
    return ActorFailure(f"{what}: an actor failed to start: {last.strip()}")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
