"""Driving a weight sync: ``WeightSync`` on the driver, ``WeightSource`` on the learner.

    sync = WeightSync(cfg.sync, cfg.generator_dtype, learner_group, generator_pool)
    sync.setup()              # once, after the actors start: plan buckets, join the transport
    sync.sync(version)        # every bucket to every generator; returns the bytes sent
    fut = sync.start(version) # the same without waiting: generators busy with a chunk load
    fut.result()              # the version once they are done (pipelined training)

Each version travels bucket by bucket: the driver queues, for every bucket, a publish call
on every learner rank and a load call on every generator, without waiting in between, so
the learner prepares bucket i + 1 while the generators load bucket i. Every sync carries
the full weights: a generator that missed versions holds the new one afterwards.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from rlalign_ray.config import SyncConfig
from rlalign_ray.errors import ActorFailure, WeightSyncError
from rlalign_ray.runtime.placement import Future, get
from rlalign_ray.sync.buckets import SyncPlan, check_half_range, plan_buckets
from rlalign_ray.sync.plan import WEIGHTS_GROUP, duplicate_gpus, gpu_uuids
from rlalign_ray.sync.targets import ActorTargets, WeightTargets
from rlalign_ray.sync.transports import (
    SharedMemoryTransport,
    WeightHandle,
    make_transport,
    shm_free_bytes,
)


class WeightSource:
    """The sending side of a sync, mixed into the learner's rank class. Every rank takes
    part (ZeRO-3 gathers a bucket's parameters on all ranks); rank 0 sends.

    The class provides ``rank``, ``named_weights()`` and ``gathered(params)`` (a context in
    which ``params`` hold their full values).
    """

    rank: int

    def named_weights(self) -> Any:
        raise NotImplementedError

    def gathered(self, params: Sequence[torch.nn.Parameter] | None = None) -> Any:
        raise NotImplementedError

    def weight_extras(self, params: Sequence[Any]) -> list[torch.nn.Parameter]:
        """More parameters the values of ``params`` are computed from (gathered with them
        under ZeRO-3); none by default."""
        return []

    def weight_values(self, params: Sequence[Any]) -> Sequence[torch.Tensor]:
        """What travels for ``params`` (by default the parameters themselves; LoRA: the
        merged weights)."""
        return params

    def weight_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, full shape) of every parameter, in order (ZeRO-3 keeps it in ds_shape)."""
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.named_weights()]

    def open_weight_sync(self, plan: SyncPlan) -> Any:
        """Learn the buckets; rank 0 builds its transport and returns its address."""
        params = dict(self.named_weights())
        self._sync_params = [[params[n] for n in b.names] for b in plan.buckets]
        if getattr(self, "_sync", None):
            self._sync.close()
        self._sync = make_transport(plan) if plan.sends(self.rank) else None
        return self._sync.open() if self._sync else None

    def join_weight_sync(self, address: Any) -> None:
        if self._sync:
            self._sync.connect(address, 0)

    def seal_weight_sync(self) -> None:
        """Every receiver has joined (the shared-memory transport unlinks its file)."""
        if self._sync:
            self._sync.seal()

    def release_weight_buffers(self) -> None:
        """Every generator holds the version sent: free what only they needed (CUDA IPC:
        this rank's GPU buffers)."""
        if self._sync:
            self._sync.release()

    def publish_weights(self, bucket: int) -> Any:
        """All ranks call this per bucket; rank 0 (cuda_ipc: each rank that serves a
        generator) sends it and returns the payload."""
        params = self._sync_params[bucket]
        with self.gathered([*params, *self.weight_extras(params)]):
            if not self._sync:
                return None
            values = self.weight_values(params)
            if self._sync.plan.dtype == "float16":  # from bf16 / fp32: no value may become inf
                check_half_range(self._sync.plan.buckets[bucket].names, values)
            return self._sync.send(bucket, values)


class WeightSync:
    """Moves the learner's weights to every generator, one version at a time.

    ``sources``: a ``LearnerGroup`` or actors mixing in ``WeightSource`` (rank 0 first).
    ``generators``: ``WeightTargets`` (a ``GeneratorPool``, or ``GeneratorPools``: several)
    or a list of actors with ``weight_ranks``, ``join_weight_sync`` and ``load_weights``
    (``Generator``). The targets hear when a version's loads are queued (``before_load``:
    a pool starts the chunks it still holds, so each samples with the version it was
    submitted under; ``loaded``: every call queued after them sees the new weights).
    ``on_gpu``: learner and generators hold their weights on GPUs (``auto`` then picks
    CUDA IPC for generators on a learner rank's GPU, else NCCL); None (the default): ask
    the actors. ``overlap``: the collective sender broadcasts from a thread of its own
    (pipelined training: a publish does not wait for generators busy with a chunk).

    Versions go out one at a time: ``start(v + 1)`` first waits until every generator holds
    v (the shared-memory transport reuses v - 1's slot for v + 1).

    ``inflight``: the generators were built with in-flight updates (``rollout/inflight.py``):
    their loads go to the actors' ``weights`` concurrency group and run between two decode
    steps of the chunk in progress instead of after it. The CPU transports (shared memory,
    object store, collective over gloo) support it; NCCL and CUDA IPC are refused (the
    GPU paths are not verified yet).
    """

    def __init__(
        self,
        cfg: SyncConfig,
        dtype: str,
        sources: Sequence[Any],
        generators: WeightTargets | Sequence[Any],
        on_gpu: bool | None = None,
        overlap: bool = False,
        inflight: bool = False,
    ):
        self.cfg, self.dtype, self.on_gpu, self.overlap = cfg, dtype, on_gpu, overlap
        self.inflight = inflight
        self._sources = sources
        if not isinstance(generators, WeightTargets):
            generators = ActorTargets(generators)
        self.targets: WeightTargets = generators
        self.plan: SyncPlan | None = None
        self.pending: Future | None = None
        self.version = 0  # the version last sent (a replaced generator is given it)
        self._rejoining = False

    @property
    def sources(self) -> list[Any]:
        return list(getattr(self._sources, "actors", self._sources))

    @property
    def generators(self) -> list[Any]:
        return list(self.targets.receivers())

    def setup(self) -> SyncPlan:
        """Plan the buckets from the learner's parameters and join every actor to the
        transport (for the collective one: a group rendezvous at learner rank 0)."""
        c = self.cfg
        layout = self._wait({self.sources[0].weight_layout.remote(): "learner rank 0"}, "layout")
        dtype = getattr(torch, self.dtype)
        nbytes = sum(math.prod(shape) for _, shape in layout[0]) * dtype.itemsize
        gens = {g.weight_ranks.remote(): f"generator {i}" for i, g in enumerate(self.generators)}
        ranks = self._wait(gens, "set-up: the generators' weight-sync ranks")
        ranks_gpus, gen_gpus = self._actor_gpus()
        owners = _owners(ranks_gpus, gen_gpus)
        on_gpu = self.on_gpu if self.on_gpu is not None else owners is not None
        if c.transport == "auto":
            transport = self._auto_transport(nbytes, owners if on_gpu else None)
        else:
            transport = c.transport
        backend = c.backend if c.backend != "auto" else ("nccl" if on_gpu else "gloo")
        self._check_layout(transport, backend, owners, ranks)
        if transport == "collective" and backend == "nccl":
            _check_distinct_gpus(ranks_gpus[0], gen_gpus, ranks)
        self.plan = SyncPlan(
            transport=transport,
            backend=backend,
            dtype=self.dtype,
            buckets=plan_buckets(layout[0], dtype, int(c.bucket_mb * 2**20)),
            timeout_s=c.timeout_s,
            world_size=1 + sum(ranks),
            owners=tuple(owners or ()) if transport == "cuda_ipc" else (),
            overlap=self.overlap and transport == "collective",
        )
        opened = self._wait(self._labelled("open_weight_sync", self.plan), "set-up")
        address = opened[0]
        calls = {
            s.join_weight_sync.remote(address): f"learner rank {r}"
            for r, s in enumerate(self.sources)
        }
        # a generator's first rank: in a group, after every rank of the ones before it
        first = [
            1 + sum(ranks[:i]) if transport == "collective" else i + 1 for i in range(len(ranks))
        ]
        for i, g in enumerate(self.generators):
            calls[g.join_weight_sync.remote(self.plan, address, first[i])] = f"generator {i}"
        self._wait(calls, "joining")
        self._wait(self._labelled("seal_weight_sync"), "set-up")
        self.targets.on_replaced(self.rejoin)  # a replaced generator joins and loads
        return self.plan

    def rejoin(self, index: int) -> None:
        """Generator ``index`` was replaced by a new actor (``GeneratorPool.replace``): set
        the transport up again for every generator and send them the current version, so
        the new one samples with the same weights as the others. A sync in flight (which
        the dead generator broke) is settled by this one."""
        if self.plan is None:
            return
        broken, self.pending = self.pending, None
        self._rejoining = True
        try:
            if broken is not None:
                try:
                    broken.result()
                except (ActorFailure, WeightSyncError):
                    pass  # the dead generator's loads; the others finished theirs
            self.setup()
            nbytes = self.sync(self.version) if self.version else 0
        finally:
            self._rejoining = False
        if broken is not None:
            broken.resolve(nbytes or self.plan.num_bytes)

    def _actor_gpus(self) -> tuple[list[list[str]], list[list[str]]]:
        """The GPUs (UUIDs, current device first; [] for none) of every learner rank and
        of every generator, asked of the actors."""
        actors = [*self.sources, *self.generators]
        uuids = get(
            [a.__ray_call__.remote(lambda _: gpu_uuids()) for a in actors],
            "sync set-up: the actors' GPUs",
            self.cfg.timeout_s,
        )
        return uuids[: len(self.sources)], uuids[len(self.sources) :]

    def _check_layout(
        self, transport: str, backend: str, owners: list[int] | None, ranks: list[int] = ()
    ) -> None:
        """Layouts a transport cannot serve, named before any group is built."""
        if self.inflight and (transport == "cuda_ipc" or backend == "nccl"):
            raise WeightSyncError(
                f"rollout.inflight_updates: not supported with the {transport} transport "
                f"({backend}) yet, only with shared_memory, object_store or collective over "
                "gloo (the GPU loading paths are not verified); turn inflight_updates off or "
                "set sync.transport"
            )
        if transport == "cuda_ipc" and (owners is None or -1 in owners):
            lone = [i for i, o in enumerate(owners or []) if o < 0] or "all"
            raise WeightSyncError(
                f"cuda_ipc weight sync: generators {lone} do not share a learner rank's GPU "
                "(rollout.placement.colocate_with: learner, with GPUs on both); use "
                "sync.transport: auto"
            )
        if transport == "cuda_ipc" and any(r > 1 for r in ranks):
            raise WeightSyncError(
                f"cuda_ipc weight sync: generators {[i for i, r in enumerate(ranks) if r > 1]} "
                "run a tensor-parallel engine over several GPUs, which a learner rank's GPU "
                "buffer cannot serve; use rollout.vllm.tensor_parallel_size: 1 or sync.transport: "
                "collective"
            )
        if transport == "collective" and backend == "nccl" and owners and 0 in owners:
            raise WeightSyncError(
                f"collective (NCCL) weight sync: generator {owners.index(0)} runs on learner "
                "rank 0's GPU, and NCCL refuses two ranks on one GPU; use sync.transport: "
                "auto (CUDA IPC for colocated generators)"
            )

    def _auto_transport(self, nbytes: int, owners: list[int] | None) -> str:
        """On GPUs, generators that share a learner rank's GPU read it through CUDA IPC;
        others get NCCL, which moves buckets device to device (a mix of both, with one
        on rank 0's GPU, is refused: colocate every generator or none). On CPU, with
        every generator on learner rank 0's node and room in its /dev/shm, shared memory:
        the learner's one copy and no serialisation, HF generators copy nothing (bench
        weights, 100M params fp32, 2 cores: docs/benchmarks.md); across CPU nodes the object
        store, which moves a bucket once per node (gloo broadcasts over TCP to each
        receiver)."""
        if owners is not None:
            if all(o >= 0 for o in owners):
                return "cuda_ipc"
            if 0 in owners:
                raise WeightSyncError(
                    f"weight sync: generators {[i for i, o in enumerate(owners) if o == 0]} "
                    f"share learner rank 0's GPU and generators "
                    f"{[i for i, o in enumerate(owners) if o < 0]} have GPUs of their own; "
                    "colocate every generator with the learner (CUDA IPC) or none (NCCL)"
                )
            return "collective"
        if self.on_gpu:
            return "collective"
        import ray

        def node(actor: Any) -> Any:
            return actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())

        limit = self.cfg.timeout_s
        nodes = get([node(a) for a in [self.sources[0], *self.generators]], "sync set-up", limit)
        free = get(self.sources[0].__ray_call__.remote(lambda _: shm_free_bytes()), "sync", limit)
        room = free > 1.2 * SharedMemoryTransport.SLOTS * nbytes
        return "shared_memory" if len(set(nodes)) == 1 and room else "object_store"

    def in_flight(self) -> Future | None:
        """The sync still in flight (``start``), if any."""
        return self.pending

    def wait(self) -> None:
        """Wait for the sync in flight, if any (its errors raise here)."""
        if self.pending is not None:
            self.pending.result()

    def abandon(self) -> None:
        """Forget the sync in flight (a learner rank that died broke it; ``setup`` and the
        next sync start over)."""
        self.pending = None

    def sync(self, version: int) -> int:
        """Send ``version`` to every generator and wait; returns the bytes sent."""
        return self.start(version).result()

    def start(self, version: int) -> Future:
        """Queue every bucket's publish (learner ranks) and load (each generator) without
        waiting; the Future's result is the bytes sent, once every generator reports
        ``version``. A generator busy sampling loads after its current call."""
        if self.plan is None:
            raise WeightSyncError("WeightSync.sync called before setup()")
        if self.pending is not None:
            self.pending.result()
        # the loads go to the targets' loaders (a pool's dispatchers: one call per group,
        # queued after the chunks sent to it, returning its group's versions)
        loaders = self.targets.loaders()
        self.targets.before_load(version)  # a pool starts its queued chunks ahead of them
        calls = self._queue_buckets(version, loaders)
        self.targets.loaded(version)
        self.version = version
        deadline = time.monotonic() + self.cfg.timeout_s
        fetch = functools.partial(self._fetch, calls, version, deadline)
        finish = functools.partial(self._finish, version, len(loaders))
        self.pending = Future(list(calls), f"weight sync {version}", finish, fetch)
        return self.pending

    def _queue_buckets(self, version: int, loaders: list[tuple[str, Any]]) -> dict[Any, str]:
        """Per bucket, queue the publish on every learner rank and the load on every one of
        ``loaders``; returns every call, labelled, the loads of the last bucket last."""
        calls: dict[Any, str] = {}
        for b in range(len(self.plan.buckets)):
            sent = self._labelled("publish_weights", b)
            # receivers read rank 0's publish result (cuda_ipc: their own rank's), except
            # over a process group
            payload = (
                None
                if self.plan.transport == "collective"
                else list(sent)
                if self.plan.transport == "cuda_ipc"
                else [next(iter(sent))]
            )
            handle = WeightHandle(version, b, payload)
            loads = {self._load(g, handle): label for label, g in loaders}
            calls.update(sent)
            calls.update(loads)
        return calls

    def _load(self, generator: Any, handle: WeightHandle) -> Any:
        """Queue ``generator``'s load of one bucket (in-flight updates: in its ``weights``
        concurrency group, beside the chunk it samples)."""
        if self.inflight:
            return generator.load_weights.options(concurrency_group=WEIGHTS_GROUP).remote(handle)
        return generator.load_weights.remote(handle)

    def _fetch(self, calls: dict[Any, str], version: int, deadline: float) -> list[Any]:
        """Wait for a sync's calls (its Future's ``fetch``)."""
        self.pending = None
        try:
            return self._wait(calls, f"version {version}", deadline)
        except (ActorFailure, WeightSyncError):
            # a generator that died is replaced, and given this version (``rejoin``)
            if self._rejoining or not self.targets.heal_targets():
                raise
            return [version] * len(calls)

    def _finish(self, version: int, loads: int, values: list[Any]) -> int:
        """A sync's result (its Future's ``finish``): the bytes sent, once the last
        ``loads`` values (the last bucket's loads; a dispatcher's: a list) all report
        ``version``."""
        versions = [v for x in values[-loads:] for v in (x if isinstance(x, list) else [x])]
        if any(v != version for v in versions):
            raise WeightSyncError(
                f"{self.plan.transport} weight sync: generators report versions "
                f"{versions}, expected {version}; refusing to sample with stale weights"
            )
        if self.plan.transport == "cuda_ipc":  # every generator holds it: free the buffers
            self._wait(self._labelled("release_weight_buffers"), f"version {version}")
        return self.plan.num_bytes

    def _labelled(self, method: str, *args: Any) -> dict[Any, str]:
        return {
            getattr(s, method).remote(*args): f"learner rank {r}"
            for r, s in enumerate(self.sources)
        }

    def _wait(self, calls: dict[Any, str], what: str, deadline: float | None = None) -> list[Any]:
        """Wait for every call within ``sync.timeout_s``; the first failure (or the actors
        still busy at the deadline) ends the sync with an error naming them."""
        import ray

        name = f"{self.plan.transport} weight sync" if self.plan else "weight sync"
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        pending, values = list(calls), {}
        while pending:  # in waves (one wait per second, not per call: many generators)
            left = deadline - time.monotonic()
            if left <= 0:
                late = sorted(set(calls[r] for r in pending))
                raise WeightSyncError(
                    f"{name} ({what}): {', '.join(late)} did not finish within "
                    f"sync.timeout_s={self.cfg.timeout_s:g}s"
                )
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, left))
            try:
                values.update(zip(done, ray.get(done)))
            except Exception:  # name the failure: a dead actor first (it breaks the others)
                self._raise_first(done, calls, f"{name} ({what})")
        return [values[r] for r in calls]

    @staticmethod
    def _raise_first(done: list[Any], calls: dict[Any, str], what: str) -> None:
        import ray
        from ray.exceptions import RayActorError

        failed = []
        for r in done:
            try:
                ray.get(r)
            except RayActorError:
                get(r, f"{what}, {calls[r]}")
            except Exception:
                failed.append(r)
        for r in failed:
            get(r, f"{what}, {calls[r]}")


def _owners(ranks: list[list[str]], gens: list[list[str]]) -> list[int] | None:
    """Per generator, the learner rank on its (first) GPU (-1: none); None unless learner
    rank 0 and every generator hold a GPU."""
    firsts = [u[0] if u else None for u in ranks]
    if firsts[0] is None or any(not u for u in gens):
        return None
    return [firsts.index(u[0]) if u[0] in firsts else -1 for u in gens]


def _check_distinct_gpus(rank0: list[str], gens: list[list[str]], ranks: list[int]) -> None:
    """An NCCL group holds one rank per GPU ("Duplicate GPU detected" otherwise): refuse
    generators whose ranks would share a GPU with each other or with learner rank 0
    (fractional GPUs that Ray packed together), naming them."""
    members = {"learner rank 0": rank0[:1]}
    members.update({f"generator {i}": u[: ranks[i]] for i, u in enumerate(gens)})
    shared = duplicate_gpus(members)
    if shared:
        which = "; ".join(f"{', '.join(who)} on GPU {u}" for u, who in shared.items())
        raise WeightSyncError(
            f"collective (NCCL) weight sync: {which}. NCCL refuses two ranks on one GPU "
            '("Duplicate GPU detected"): give each generator whole GPUs '
            "(rollout.resources.num_gpus: 1), colocate every generator with the learner "
            "(rollout.placement.colocate_with: learner: CUDA IPC), or sync through host "
            "memory (sync.transport: object_store)"
        )
