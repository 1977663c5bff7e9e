"""Simulated actors hosted many to a process: a bench harness (``bench scale``), never used
by training.

A Ray actor is a process: about 65 MB of private memory and, idle, about 9 ms of CPU per
second (its main thread wakes every 10 ms to check for signals), so 256 simulated actors
took more than the 2 cores of a small machine before doing any work. Here a ``SimHost``
actor (asyncio, one process) runs up to ``per_host`` simulated actors of one role on one
node, and each simulated actor is a ``HostedActor``: a handle that answers as a Ray actor
handle does where the pools, ``Rollouts``, ``WeightSync`` and the dispatchers use one
(``actor.method.remote(...)``, ``.options(num_returns=k)``, ``__ray_call__``; it pickles
into other actors). Every such call is one Ray call to the host, which returns real
ObjectRefs owned by the caller: the driver makes as many Ray calls per simulated actor as
with one process each, so ``bench scale`` still measures its orchestration at N actors.

As in a Ray actor, a simulated actor runs one call at a time (a thread of its own in the
host), in the order each caller sent them: every call carries the sending handle's sequence
number (a handle that arrives in another process by pickling is a new caller) and the host
holds a call back until those sent before it are queued.

``make_actor`` (``runtime/pools.py``) starts a class that has ``rlalign_start_actor`` with
it (``start_hosted``): simulated actor i goes to a host on the node of its placement bundle,
started (in the bundle of its first actor) when that node's last host is full. What hosting
cannot do, it refuses with an ``ActorFailure`` instead of pretending: a hosted actor is not
replaced (its process runs the others: a dead host means its whole group is dead), and
``kill`` retires one (its later calls fail) until the last of its host's actors is killed,
which ends the process.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlalign_ray.errors import ActorFailure

OPTIONS = {"num_returns"}  # what .options(...) on a hosted method takes


class SimHost:
    """Up to ``capacity`` simulated actors of ``cls`` (members 0..capacity-1), each run by a
    thread of its own, one call at a time in each caller's order."""

    def __init__(self, cls: type, capacity: int):
        self.cls, self.capacity = cls, capacity
        self.members: dict[int, Any] = {}
        self.labels: dict[int, str] = {}
        self.retired: set[int] = set()
        # one thread per member (started on its first call): its calls run in turn
        self.threads = [ThreadPoolExecutor(1, f"member{i}") for i in range(capacity)]
        self.next: dict[tuple[int, int], int] = {}  # (member, caller) -> next sequence number
        self.held: dict[tuple[int, int], dict[int, tuple[Any, asyncio.Future]]] = {}

    async def call(self, _member: int, _caller: int, _seq: int, _what: Any, *args, **kwargs):
        """Member ``_member``'s ``_what`` (a method name; a function ``f(instance, ...)``, as
        ``__ray_call__`` takes; None: construct it, ``args`` = (label, constructor args))."""
        job = functools.partial(self._job, _member, _what, args, kwargs)
        return await (await self._queue(_member, _caller, _seq, job))

    async def skip(self, member: int, caller: int, seq: int) -> None:
        """Sequence number ``seq`` of ``caller`` will not come (its submission failed)."""
        await self._queue(member, caller, seq, None)

    async def retire(self, member: int) -> None:
        """Killed (``HostedActor.kill``): the member's calls run after this fail."""
        self.retired.add(member)

    async def ping(self) -> int:
        return len(self.members)

    def _queue(self, member: int, caller: int, seq: int, job: Any) -> asyncio.Future:
        """A future that resolves, in ``caller``'s order, to ``job``'s own future on the
        member's thread (None for a skipped number)."""
        key, ticket = (member, caller), asyncio.get_running_loop().create_future()
        held = self.held.setdefault(key, {})
        held[seq] = (job, ticket)
        nxt = self.next.get(key, 0)
        while nxt in held:
            job, t = held.pop(nxt)
            run = None if job is None else self.threads[member].submit(job)
            t.set_result(run and asyncio.wrap_future(run))
            nxt += 1
        self.next[key] = nxt
        if not held:
            del self.held[key]
        return ticket

    def _job(self, member: int, what: Any, args: tuple, kwargs: dict) -> Any:
        if what is None:
            label, init = args
            self.labels[member] = label
            self.members[member] = self.cls(*init)
            return None
        if member in self.retired:
            raise ActorFailure(f"{self.labels[member]} was killed (hosted simulated actor)")
        obj = self.members.get(member)
        if obj is None:
            raise ActorFailure(
                f"{self.labels.get(member, member)}: the hosted simulated actor did not start "
                "(its constructor failed: see the host's log) or is not started yet"
            )
        if callable(what):
            return what(obj, *args, **kwargs)
        return getattr(obj, what)(*args, **kwargs)


class HostedMethod:
    """``handle.method``: ``.remote(...)`` is one Ray call to the host; ``.options`` takes
    ``num_returns`` (as a Ray actor method's)."""

    def __init__(self, actor: HostedActor, what: Any, options: dict[str, Any] | None = None):
        self.actor, self.what, self.opts = actor, what, options or {}

    def options(self, **options: Any) -> HostedMethod:
        if set(options) - OPTIONS:
            raise ActorFailure(
                f"{self.actor.label}: hosted simulated actors take only {sorted(OPTIONS)} "
                f"in .options(), not {sorted(set(options) - OPTIONS)} (bench/hosted.py)"
            )
        return HostedMethod(self.actor, self.what, {**self.opts, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.actor.submit(self.what, self.opts, args, kwargs)


class HostedActor:
    """Simulated actor ``member`` of ``host`` (``label``: its role and pool index, for
    errors), answering as a Ray actor handle; a copy made by pickling is a caller of its own."""

    def __init__(self, host: Any, member: int, label: str):
        self.host, self.member, self.label = host, member, label
        self._caller = int.from_bytes(os.urandom(7), "little")
        self._seq = itertools.count()

    def __reduce__(self):
        return HostedActor, (self.host, self.member, self.label)

    def __repr__(self) -> str:
        return f"HostedActor({self.label!r}, member {self.member})"

    def __getattr__(self, name: str) -> HostedMethod:
        if name.startswith("_"):  # pickle's, copy's and Ray's probes: not actor methods
            raise AttributeError(name)
        return HostedMethod(self, name)

    @property
    def __ray_call__(self) -> HostedMethod:
        return HostedMethod(self, _ray_call)

    def submit(self, what: Any, options: dict[str, Any], args: tuple, kwargs: dict) -> Any:
        """One Ray call to the host carrying this handle's next sequence number; its refs."""
        seq = next(self._seq)
        method = self.host.call.options(**options) if options else self.host.call
        try:
            return method.remote(self.member, self._caller, seq, what, *args, **kwargs)
        except BaseException:
            self.host.skip.remote(self.member, self._caller, seq)  # later calls go on
            raise

    def kill(self) -> None:
        """``ray.kill`` for a hosted actor (the driver that started it): retires it; the
        host process ends with the last of its actors."""
        key = self.host._actor_id.hex()
        host = HOSTS.get(key)
        if host is None and key in KILLED:  # as ray.kill: a dead actor stays dead
            return
        if host is None:
            raise ActorFailure(
                f"{self.label}: a hosted simulated actor is killed by the driver that "
                "started it (bench/hosted.py)"
            )
        host.retire(self.member)


def _ray_call(obj: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``__ray_call__``: ``fn(actor, *args)``."""
    return fn(obj, *args, **kwargs)


# ---- the driver's side: which host each simulated actor goes to ----------------------------
@dataclass
class Host:
    """The driver's record of one ``SimHost``: its members and those killed."""

    handle: Any
    capacity: int
    members: list[int] = field(default_factory=list)
    retired: set[int] = field(default_factory=set)
    started: list[tuple[str, str, int]] = field(default_factory=list)  # its keys in STARTED

    def retire(self, member: int) -> None:
        import ray

        self.retired.add(member)
        if len(self.retired) < len(self.members):
            self.handle.retire.remote(member)
            return
        KILLED.add(self.handle._actor_id.hex())
        HOSTS.pop(self.handle._actor_id.hex(), None)
        for key in [k for k, h in OPEN.items() if h is self]:
            del OPEN[key]
        STARTED.difference_update(self.started)
        ray.kill(self.handle, no_restart=True)


HOSTS: dict[str, Host] = {}  # host actor id -> its record (the driver's, while it runs)
KILLED: set[str] = set()  # host actor ids this driver killed
OPEN: dict[tuple[str, str, str], Host] = {}  # (role, placement group, node) -> its newest host
STARTED: set[tuple[str, str, int]] = set()  # (role, placement group, pool index)
NODES: dict[str, dict[int, str]] = {}  # placement group -> its bundles' nodes


def start_hosted(spec: Any, slot: Any, i: int) -> HostedActor:
    """``make_actor`` for a hosted class (``spec.cls.per_host`` actors per ``SimHost``):
    actor ``i`` of ``spec`` in ``slot``'s node's open host (a new one, in ``slot``'s bundle,
    if that is full). A second start of ``i`` (a replacement) is refused."""
    group = slot.group.id.hex()
    if (spec.name, group, i) in STARTED:
        raise ActorFailure(
            f"{spec.name} {i}: hosted simulated actors (bench/hosted.py) are not replaced: "
            f"one process runs up to {spec.cls.per_host} of them, and a dead one means its "
            "host is gone. Run bench scale with --per-host 0 (a process per actor) to "
            "exercise actor replacement"
        )
    key = (spec.name, group, bundle_node(slot))
    host = OPEN.get(key)
    if host is None or len(host.members) >= host.capacity:
        host = OPEN[key] = start_host(spec, slot)
    member = len(host.members)
    host.members.append(member)
    host.started.append((spec.name, group, i))
    STARTED.add((spec.name, group, i))
    actor = HostedActor(host.handle, member, f"{spec.name} {i}")
    actor.submit(None, {}, (actor.label, spec.args(i)), {})  # its constructor, first in turn
    return actor


def start_host(spec: Any, slot: Any) -> Host:
    """A ``SimHost`` for ``spec.cls`` with ``make_actor``'s options in ``slot``'s bundle."""
    import ray

    from rlalign_ray.runtime.placement import actor_options

    capacity = int(spec.cls.per_host)
    handle = (
        ray.remote(SimHost)
        .options(**actor_options(spec, slot), max_concurrency=10_000)
        .remote(spec.cls, capacity)
    )
    host = Host(handle, capacity)
    HOSTS[handle._actor_id.hex()] = host
    return host


def bundle_node(slot: Any) -> str:
    """The node id of ``slot``'s bundle (the group's table is read once)."""
    from ray.util.placement_group import placement_group_table

    group = slot.group.id.hex()
    if group not in NODES:
        NODES[group] = dict(placement_group_table(slot.group)["bundles_to_node_id"])
    return NODES[group].get(slot.bundle, "")


def hosted(cls: type, per_host: int) -> type:
    """``cls`` (a simulated role's class) hosted ``per_host`` to a process (0: unchanged,
    each actor a process of its own)."""
    if per_host <= 0:
        return cls
    attrs = {"per_host": per_host, "rlalign_start_actor": staticmethod(start_hosted)}
    return type(cls.__name__, (cls,), attrs)


def host_count(actors: int, per_host: int, nodes: int) -> int:
    """At most how many processes ``actors`` simulated actors of one role take over
    ``nodes`` nodes (each node's hosts fill in turn)."""
    if per_host <= 0:
        return actors
    return min(actors, actors // per_host + nodes)
