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

from rlalign_ray.config import Resources
from rlalign_ray.errors import ActorFailure, PlacementError, RlalignError
from rlalign_ray.runtime.cluster import describe_cluster, worker_env


@dataclass
class RoleSpec:
    """How many actors of which class a role runs, and what each needs."""

    name: str
    cls: type
    num_actors: int
    resources: Resources
    args: Callable[[int], tuple] = lambda i: ()  # constructor args for actor i
    strategy: str = "PACK"  # Ray placement strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD


@dataclass
class RolePool:
    spec: RoleSpec
    actors: list[Any] = field(default_factory=list)
    placement_group: Any = None

    @property
    def name(self) -> str:
        return self.spec.name


def place(specs: Sequence[RoleSpec], timeout_s: float) -> list[Any]:
    """One placement group per role; wait for all, or fail naming what cannot fit."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group([s.resources.bundle()] * s.num_actors, strategy=s.strategy,
                              name=f"rlalign-{s.name}") for s in specs]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) == len(groups):
        return groups
    pending = [s for s, g in zip(specs, groups) if not _is_ready(g)]
    for g in groups:
        remove_placement_group(g)
    asked = "\n".join(f"  {s.name}: {s.num_actors} x {s.resources.bundle()} ({s.strategy})"
                      for s in specs)
    names = ", ".join(s.name for s in pending) or "some roles"
    raise PlacementError(
        f"the cluster cannot place {names} within {timeout_s:g}s "
        f"(run.placement_timeout_s).\nAsked for:\n{asked}\nThe cluster has:\n{describe_cluster()}\n"
        "Lower the per-role resources or actor counts, or add nodes with those resources."
    )


def _is_ready(group: Any) -> bool:
    import ray

    ready, _ = ray.wait([group.ready()], timeout=0)
    return bool(ready)


def start_pools(specs: Sequence[RoleSpec], timeout_s: float) -> dict[str, RolePool]:
    """Place every role, then start its actors inside its placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    groups = place(specs, timeout_s)
    pools: dict[str, RolePool] = {}
    for spec, group in zip(specs, groups):
        remote_cls = ray.remote(spec.cls)
        pool = RolePool(spec=spec, placement_group=group)
        for i in range(spec.num_actors):
            opts = spec.resources.ray_options()
            actor = remote_cls.options(
                **opts,
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                runtime_env={"env_vars": worker_env(cpu_only=spec.resources.num_gpus == 0)},
            ).remote(*spec.args(i))
            pool.actors.append(actor)
        pools[spec.name] = pool
    return pools


def stop_pools(pools: dict[str, RolePool]) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for pool in pools.values():
        for actor in pool.actors:
            ray.kill(actor, no_restart=True)
        if pool.placement_group is not None:
            remove_placement_group(pool.placement_group)


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
        raise ActorFailure(f"{what}: an actor died ({_first_line(e)}). The run stops here; "
                           "check the actor's log above for the cause (out of memory, a lost "
                           "node, a crash).") from None
    except RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, RlalignError):
            cause.args = (f"{what}: {cause}",)
            raise cause from None
        raise ActorFailure(f"{what} failed: {type(cause).__name__ if cause else 'error'}: "
                           f"{cause if cause else _first_line(e)}\n{e}") from None
    except GetTimeoutError:
        waited = time.monotonic() - start
        raise ActorFailure(f"{what} did not finish within {waited:.0f}s (run.call_timeout_s)") from None


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
