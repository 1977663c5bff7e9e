"""What every pool shares: its actors, their placement, and futures over their calls.

A pool owns a set of actors of one class (its role): it builds their placement, starts
them, and turns each method call into refs or a ``Future``. Pools are created unstarted;
``launch`` places any number of them together (so that one can be colocated with
another) and starts them:

    gen = GeneratorPool(cfg)
    judge = RewardPool(cfg, name="judge", cls=MyJudge, resources=Resources(num_cpus=2))
    with launch(cfg.run, gen, judge, learner := LearnerGroup(cfg)):
        ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from rlalign_ray.config import Config, Placement, Resources, RunConfig
from rlalign_ray.errors import ActorFailure, ConfigError
from rlalign_ray.roles import ROLES, role_class
from rlalign_ray.runtime.cluster import connect, describe_cluster
from rlalign_ray.runtime.placement import (  # noqa: F401 (part of the API)
    Future,
    RoleSpec,
    actor_died,
    get,
    kill,
    make_actor,
    slot_node,
    start_pools,
    wait_placed,
)

log = logging.getLogger(__name__)


class ActorPool:
    """The actors of one role (``roles.ROLES``): ``num_actors`` of ``cls`` (default: the
    config section's ``actor_class``, else the role's built-in class), each in a bundle of
    ``resources`` placed by ``placement`` (``colocate_with``: another pool's name); each
    defaults to the role's config section. A subclass says which role it runs and what
    each actor is built with (``actor_args``)."""

    role = "actors"
    restartable = True  # dead actors are replaced (``run.max_actor_restarts``)

    def __init__(
        self,
        cfg: Config,
        num_actors: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
    ):
        role = ROLES[self.role]
        section = getattr(cfg, role.section)
        self.cfg = cfg
        self.name = name or self.role
        self.spec = RoleSpec(
            self.name,
            role_class(self.role, cls, cfg),
            num_actors or role.num_actors(cfg),
            replace(resources or section.resources),
            self.actor_args,
            replace(placement or section.placement),
        )
        self.timeout_s = cfg.run.call_timeout_s
        self.actors: list[Any] = []
        self.placement_group: Any = None  # its own group (None when colocated)
        self.slots: list[Any] = []  # actor i's placement bundle (``runtime.placement.Slot``)
        self._turn = -1  # the actor ``next_actor`` gave last
        self.max_restarts = 0  # dead actors replaced per run (``run.max_actor_restarts``)
        self.placement_timeout_s = 120.0  # a replacement's bundle must be placed by then
        self.restarts = 0
        self.failures: list[str] = []  # "role i on node" of every actor that died
        self.on_replace: list[Callable[[int], None]] = []  # called with i once replaced
        if self.restartable:
            self.replace_as(cfg.run)

    def actor_args(self, i: int) -> tuple:
        """The constructor arguments of actor ``i`` (what the role's class takes)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.actors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.spec.num_actors} x {self.spec.cls.__name__})"

    def replace_as(self, run: RunConfig) -> None:
        """Replace dead actors as ``run`` says (``max_actor_restarts``, ``placement_timeout_s``)."""
        self.max_restarts = run.max_actor_restarts
        self.placement_timeout_s = run.placement_timeout_s

    def next_actor(self) -> Any:
        """The actors in turn (round robin), for one call each."""
        self._turn += 1
        return self.actors[self._turn % len(self.actors)]

    def call(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every actor; returns the refs."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def gather(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every actor, waited for (errors name the pool)."""
        return get(self.call(method, *args), f"{self.name} {method}", self.timeout_s)

    def started(self) -> None:
        """Called by ``launch`` once every actor of every pool exists (a group's rendezvous
        happens here); by default waits until every actor answers."""
        self.gather("ping")

    # ---- resumable checkpoints ------------------------------------------------------------
    def rng_states(self) -> list[Any]:
        """Every actor's random state, in actor order (between steps: nothing in flight); for
        pools whose actors sample (generators)."""
        return self.gather("get_rng_state")

    def set_rng_states(self, states: Sequence[Any]) -> None:
        """Restore ``rng_states``; with another number of actors, their streams differ
        from the run that saved them (a warning)."""
        if len(states) != len(self.actors):
            log.warning(
                "%s: the checkpoint holds %d generators' random states, the pool has %d; "
                "unseeded samples differ from the run that saved it",
                self.name,
                len(states),
                len(self.actors),
            )
            return
        get(
            [a.set_rng_state.remote(s) for a, s in zip(self.actors, states)],
            f"{self.name} set_rng_state",
            self.timeout_s,
        )

    # ---- dead actors --------------------------------------------------------------------
    def replace(self, index: int) -> Any:
        """Replace actor ``index``, which died, by a new one of the same class and options
        in the same placement bundle; then ``on_replace`` hooks run (a generator is given
        the current weights). Past ``max_restarts`` replacements the run stops with an
        error naming the role, the actors and the nodes that failed."""
        node = slot_node(self.slots[index]) if index < len(self.slots) else "an unknown node"
        self.failures.append(f"{self.name} {index} on {node}")
        if self.restarts >= self.max_restarts or index >= len(self.slots):
            raise ActorFailure(
                f"{self.name} pool: an actor died ({self.name} {index} on {node}) after "
                f"{self.restarts} restarts of this role (run.max_actor_restarts="
                f"{self.max_restarts}); the run stops here. Actors that died: "
                f"{', '.join(self.failures)}. Check the actors' logs above for the cause (out "
                "of memory, a lost node, a crash)."
            )
        try:
            kill(self.actors[index])
        except Exception:  # already gone
            pass
        log.warning(
            "%s %d on %s died; starting a replacement (%d of run.max_actor_restarts=%d)",
            self.name,
            index,
            node,
            self.restarts + 1,
            self.max_restarts,
        )
        slot = self.slots[index]
        if not wait_placed(slot, self.placement_timeout_s):
            raise ActorFailure(
                f"{self.name} pool: an actor died ({self.name} {index} on {node}) and its "
                f"placement bundle {self.spec.resources.bundle()} could not be placed again "
                f"within {self.placement_timeout_s:g}s (run.placement_timeout_s): its node is "
                f"gone and no live node has room for it. The cluster has:\n"
                f"{describe_cluster()}\nAdd a node with those resources and resume from the "
                "last checkpoint (trainer.resume=auto)."
            )
        actor = make_actor(self.spec, slot, index)
        get(actor.ping.remote(), f"{self.name} {index} (replacement)", self.timeout_s)
        self.actors[index] = actor
        self.restarts += 1
        self.replaced(index)
        for hook in self.on_replace:
            hook(index)
        return actor

    def replaced(self, index: int) -> None:
        """A subclass's own bookkeeping for a new actor ``index`` (before the hooks)."""

    def heal(self, timeout_s: float = 5.0) -> list[int]:
        """Ping every actor and replace those that died; returns their indices. An actor
        still busy after ``timeout_s`` counts as alive (a dead one answers at once)."""
        dead = self.dead_actors(timeout_s)
        for i in dead:
            self.replace(i)
        return dead

    def dead_actors(self, timeout_s: float = 5.0) -> list[int]:
        """The indices of the actors that died (a ping each, all awaited together)."""
        import ray

        refs = [a.ping.remote() for a in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        return [i for i, r in enumerate(refs) if actor_died(r)]

    def restart_all(self) -> None:
        """Kill every actor and start new ones in the same bundles, then ``started``
        (a group's rendezvous): a learner group that lost a rank starts again."""
        for a in self.actors:
            try:
                kill(a)
            except Exception:  # already gone
                pass
        self.actors = [make_actor(self.spec, slot, i) for i, slot in enumerate(self.slots)]
        self.started()


def start(
    pools: Sequence[ActorPool],
    placement_timeout_s: float,
    placed: Callable[[], None] | None = None,
) -> None:
    """Place every pool (colocated ones share their host's bundles), start the actors, call
    ``placed`` (checks that need the actors on their nodes, before any model loads), and
    call each pool's ``started``."""
    names = [p.name for p in pools]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError([f"pools: names {sorted(dup)} are used twice; give each a name="])
    started = start_pools([p.spec for p in pools], placement_timeout_s)
    for p in pools:
        p.actors = started[p.name].actors
        p.placement_group = started[p.name].placement_group
        p.slots = started[p.name].slots
    if placed is not None:
        placed()
    for p in pools:
        p.started()


def stop(pools: Sequence[ActorPool]) -> None:
    """Kill every pool's actors and remove their placement groups."""
    from ray.util.placement_group import remove_placement_group

    for pool in pools:
        for actor in [*pool.actors, *getattr(pool, "helpers", [])]:
            kill(actor)
        if pool.placement_group is not None:
            remove_placement_group(pool.placement_group)
        pool.actors, pool.placement_group, pool.slots = [], None, []


@contextmanager
def launch(run: RunConfig, *pools: ActorPool):
    """Connect to Ray (``run.ray_address``, ``RAY_ADDRESS``, or an embedded local
    instance), start ``pools`` together, and stop them (and an embedded Ray) on exit."""
    import ray

    cpus = sum(p.spec.num_actors * p.spec.resources.num_cpus for p in pools)
    started_ray = connect(run, cpus)
    try:
        start(pools, run.placement_timeout_s)
        yield pools
    finally:
        stop(pools)
        if started_ray:
            ray.shutdown()
