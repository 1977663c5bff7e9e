"""Weight transports: how one bucket of weights gets from learner rank 0 to the generators.

A ``WeightTransport`` has a sending half (``open``, ``connect``, ``send``; learner rank 0)
and a receiving half (``connect``, ``receive``; each generator). Both halves are built
from the same ``SyncPlan``, so a bucket's layout never travels. Weights travel in the
generators' dtype. ``WeightSync`` (``sync/weight_sync.py``) drives them bucket by bucket,
publish and receive running at the same time.

- ``ObjectStoreTransport``: ``send`` puts the bucket's tensors, as numpy arrays, once into
  Ray's shared-memory store; receivers on a node read the same object without copying.
- ``SharedMemoryTransport``: a shared-memory segment on learner rank 0's node with two
  slots used in turn; ``send`` casts a bucket into the next slot, and a generator on that
  node points its parameters at the slot (HF backend: no copy) or copies from it (vLLM).
- ``CudaIpcTransport`` (``sync/cuda_ipc.py``): generators that share a learner rank's GPU
  open that rank's GPU buffer of the bucket through CUDA IPC and load from it (colocated
  layouts). ``make_transport`` imports it when a plan asks for it.
- ``CollectiveTransport``: a process group of its own (gloo or NCCL) between learner rank 0
  and every generator, built from a TCPStore hosted by rank 0: never the default group,
  so DeepSpeed's group and whatever vLLM sets up in a generator stay untouched. Buckets
  are broadcast from preallocated flat buffers, reused for every bucket and version.

The tensors a backend's ``load_weights`` receives are views valid during the call only
(the collective transport reuses its buffer for the next bucket): a backend that keeps
them until ``finish_weight_update`` must copy them.

A receiving end may also run inside an inference engine's own worker processes (a vLLM
worker extension, ``rollout/vllm_worker.py``): each tensor-parallel worker joins with its
own rank and loads its own shard, so no bucket is pickled between processes. Such an end
is told its node and address (``node``, ``ip``), which it cannot ask Ray for.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch

from rlalign_ray.errors import WeightSyncError
from rlalign_ray.sync.buckets import (
    empty_buffer,
    flatten_into,
    from_numpy,
    to_numpy,
    unflatten,
)
from rlalign_ray.sync.plan import SyncPlan, WeightHandle  # noqa: F401 (torch-free)


class WeightTransport(ABC):
    name: str
    # whether a receiving end can run in an engine's worker process (one that is not a Ray
    # worker): every transport but the object store, whose buckets only Ray can fetch
    in_engine_workers = True

    def __init__(self, plan: SyncPlan):
        self.plan = plan
        self.rank = 0
        self.timeout = timedelta(seconds=plan.timeout_s)
        self.node: str | None = None  # this end's Ray node id and IP (None: ask Ray)
        self.ip: str | None = None
        self.who: str | None = None  # how errors name this end (None: from the rank)

    def open(self) -> Any:
        """Sender, before anyone connects: the address receivers need (None: nothing)."""
        return None

    def connect(self, address: Any, rank: int) -> None:
        """Join the sync as ``rank`` (0: the sender, i: generator i - 1)."""
        self.rank = rank

    def seal(self) -> None:
        """Sender, after every receiver has connected."""

    def close(self) -> None:
        """Release what this end holds (a new sync replaces it)."""

    def release(self) -> None:
        """Sender, once every generator holds the version sent: free what only the
        receivers needed (CUDA IPC: the GPU buffers)."""

    def node_id(self) -> str:
        return self.node if self.node is not None else node_id()

    def node_ip(self) -> str:
        return self.ip or node_ip()

    @abstractmethod
    def send(self, bucket: int, tensors: Sequence[torch.Tensor]) -> Any:
        """Sender: publish one bucket's tensors (in the plan's order); returns the payload
        receivers need (or None)."""

    @abstractmethod
    def receive(self, handle: WeightHandle, backend: Any) -> None:
        """Receiver: load one bucket into ``backend`` (a ``GenerationBackend``), and call
        its ``finish_weight_update`` after the last bucket."""

    def _load(self, handle: WeightHandle, backend: Any, tensors: list[torch.Tensor]) -> None:
        bucket = self.plan.buckets[handle.bucket]
        backend.load_weights(list(zip(bucket.names, tensors)))
        if handle.is_last(self.plan):
            backend.finish_weight_update()

    def _published(self, handle: WeightHandle, what: str, rank: int = 0) -> Any:
        """The publish call's result for ``handle`` (learner rank ``rank``'s), waiting at most
        ``sync.timeout_s`` for it."""
        try:
            return handle.published(self.plan.timeout_s, rank)
        except Exception as e:
            if type(e).__name__ != "GetTimeoutError":
                raise
            raise self._error(
                f"{what} bucket {handle.bucket} of version {handle.version}", e
            ) from None

    def _error(self, what: str, cause: BaseException) -> WeightSyncError:
        where = self.who or (f"generator {self.rank - 1}" if self.rank else "learner rank 0")
        return WeightSyncError(
            f"{self.name} weight sync: {where} could not {what} (sync.timeout_s="
            f"{self.plan.timeout_s:g}s): {type(cause).__name__}: {cause}"
        )


class ObjectStoreTransport(WeightTransport):
    """Buckets through Ray's object store (one put per bucket, fetched once per node)."""

    name = "object_store"
    in_engine_workers = False

    def __init__(self, plan: SyncPlan):
        super().__init__(plan)
        self.staging: torch.Tensor | None = None

    def send(self, bucket: int, tensors: Sequence[torch.Tensor]) -> list:
        """One ``ray.put`` of the bucket; returns ``[its ref]``. CPU tensors already in the
        generators' dtype go as they are (Ray's serialiser copies them straight into the
        store, laid out back to back); others are cast into a reused staging buffer first."""
        import ray

        dtype = self.plan.torch_dtype
        views = None
        out = []
        for i, t in enumerate(tensors):
            t = t.detach()
            if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
                if self.staging is None:
                    self.staging = empty_buffer(self.plan.max_numel, dtype)
                views = views or unflatten(self.staging, self.plan.buckets[bucket])
                t = views[i].copy_(t.reshape(views[i].shape))
            out.append(to_numpy(t))
        return [ray.put(out)]

    def receive(self, handle: WeightHandle, backend: Any) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        (ref,) = self._published(handle, "get")
        try:
            arrays = ray.get(ref, timeout=self.plan.timeout_s)
        except GetTimeoutError as e:
            raise self._error(
                f"get bucket {handle.bucket} of version {handle.version}", e
            ) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy arrays
            tensors = [from_numpy(a, self.plan.torch_dtype) for a in arrays]
        self._load(handle, backend, tensors)


class SharedMemoryTransport(WeightTransport):
    """Buckets through one shared-memory segment on learner rank 0's node.

    The segment holds two copies of the weights (slots), used in turn: the sender casts
    version v into one slot while generators may still sample from the other. A backend
    that can (the HF backend on CPU, in the segment's dtype) then simply points its
    parameters at the new slot: no receiver copies anything, so the cost of a sync is the
    sender's one copy, whatever the number of generators on the node. Other backends (vLLM
    packs weights its own way) copy from the slot as it is published.

    Every generator must run on learner rank 0's node (``auto`` picks this transport on CPU
    only then). The file is unlinked as soon as it is created; receivers open it through
    ``/proc/<sender pid>/fd/<fd>``, so nothing is left in ``/dev/shm`` even if every
    process is killed, and a generator started later can still join.

    Slot reuse is safe because the driver's ``WeightSync`` waits for every generator to
    hold version v before it publishes v + 1 into the slot v - 1 used.
    """

    name = "shared_memory"
    SLOTS = 2

    def __init__(self, plan: SyncPlan):
        super().__init__(plan)
        self.path: str | None = None
        self.fd: int | None = None
        self.slots: list[list[torch.Tensor]] = []  # slot -> bucket -> flat view
        self.slot = self.SLOTS - 1  # the slot last written

    @property
    def total(self) -> int:
        return sum(b.numel for b in self.plan.buckets)

    def open(self) -> dict[str, str]:
        import uuid

        nbytes = self.SLOTS * self.total * self.plan.torch_dtype.itemsize
        free = shm_free_bytes()
        if free < nbytes:
            raise WeightSyncError(
                f"shared_memory weight sync needs {nbytes / 2**30:.2f} GiB in {SHM_DIR}, which "
                f"has {free / 2**30:.2f} GiB free; enlarge it (docker: --shm-size) or use "
                "sync.transport: object_store"
            )
        path = os.path.join(SHM_DIR, f"rlalign-weights-{uuid.uuid4().hex}")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self.path = path
            self._map().zero_()  # touch every page once
            proc = f"/proc/{os.getpid()}/fd/{self.fd}"
            if os.path.exists(proc):  # Linux: unlink now, receivers open it through /proc
                os.unlink(path)
                self.path = proc
        except BaseException:
            os.close(self.fd)
            if os.path.exists(path):
                os.unlink(path)
            raise
        return {"path": self.path, "node": self.node_id()}

    def connect(self, address: dict[str, str], rank: int) -> None:
        super().connect(address, rank)
        if rank == 0:
            return
        if address["node"] != self.node_id():
            raise WeightSyncError(
                f"shared_memory weight sync: {self.who or f'generator {rank - 1}'} runs on "
                "another node than learner rank 0; use sync.transport: object_store or "
                "collective (or auto)"
            )
        self.path = address["path"]
        try:
            self._map()
        except (OSError, RuntimeError) as e:
            raise self._error(f"map {self.path}", e) from None

    def _map(self) -> torch.Tensor:
        total = self.total
        flat = torch.from_file(
            self.path, shared=True, size=self.SLOTS * total, dtype=self.plan.torch_dtype
        )
        self.slots = []
        for k in range(self.SLOTS):
            start, views = k * total, []
            for b in self.plan.buckets:
                views.append(flat[start : start + b.numel])
                start += b.numel
            self.slots.append(views)
        return flat

    def seal(self) -> None:
        if self.path and not self.path.startswith("/proc/") and os.path.exists(self.path):
            os.unlink(self.path)  # no /proc: unlink once every receiver has mapped it

    def close(self) -> None:
        self.slots = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def send(self, bucket: int, tensors: Sequence[torch.Tensor]) -> int:
        """Write a bucket into the next slot (a new version starts with bucket 0); returns
        the slot, which receivers read from the publish call's result."""
        if bucket == 0:
            self.slot = (self.slot + 1) % self.SLOTS
        flatten_into(self.slots[self.slot][bucket], self.plan.buckets[bucket], tensors)
        return self.slot

    def receive(self, handle: WeightHandle, backend: Any) -> None:
        slot = self._published(handle, "wait for")  # the sender has finished writing it
        views = self.slots[slot]
        if not backend.can_share(self.plan.torch_dtype):
            self._load(
                handle, backend, unflatten(views[handle.bucket], self.plan.buckets[handle.bucket])
            )
        elif handle.is_last(self.plan):  # every bucket of the slot is written: switch to it
            backend.share_weights(
                (name, t)
                for b, flat in zip(self.plan.buckets, views)
                for name, t in zip(b.names, unflatten(flat, b))
            )
            backend.finish_weight_update()


class CollectiveTransport(WeightTransport):
    """Buckets broadcast over a standalone gloo / NCCL process group.

    A broadcast that does not finish within ``sync.timeout_s`` (a peer that died or hangs)
    raises ``WeightSyncError`` on this end and aborts the group: the NCCL group is built
    with torch's asynchronous error handling off, so its watchdog does not kill the process
    first, and a rejoin (``close`` then a new group) leaves no communicator behind. With
    ``plan.overlap`` the sender copies each bucket into a buffer of its own and broadcasts
    from a thread: a publish returns at once, and the learner trains on while generators
    finish their chunks before joining the broadcast."""

    name = "collective"

    def __init__(self, plan: SyncPlan):
        super().__init__(plan)
        self.store: Any = None
        self.group: Any = None
        self.buffer: torch.Tensor | None = None
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if plan.backend == "nccl"
            else torch.device("cpu")
        )
        self._sender: Any = None  # overlap: the broadcasting thread and its buffers
        self._sent: dict[int, Any] = {}  # bucket -> its broadcast's future
        self._copies: dict[int, torch.Tensor] = {}

    def open(self) -> tuple[str, int]:
        import torch.distributed as dist

        host = self.node_ip()
        self.store = dist.TCPStore(
            host, 0, self.plan.world_size, True, self.timeout, wait_for_workers=False
        )
        return host, self.store.port

    def connect(self, address: tuple[str, int], rank: int) -> None:
        import torch.distributed as dist

        super().connect(address, rank)
        try:
            store = self.store or dist.TCPStore(*address, self.plan.world_size, False, self.timeout)
            prefixed = dist.PrefixStore("rlalign-weight-sync", store)
            self.group = self._new_group(prefixed)
        except Exception as e:
            self.close()
            raise self._error(f"join the {self.plan.backend} group at {address}", e) from None
        if rank == 0 and self.plan.overlap:
            from concurrent.futures import ThreadPoolExecutor

            self._sender = ThreadPoolExecutor(1, thread_name_prefix="rlalign-weight-send")
        else:  # one flat buffer, pages touched once, reused for every bucket and version
            self.buffer = empty_buffer(self.plan.max_numel, self.plan.torch_dtype, self.device)

    def _new_group(self, store: Any) -> Any:
        import torch.distributed as dist

        size, rank = self.plan.world_size, self.rank
        if self.plan.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            # read when the group is built: a timed-out broadcast raises here (and the group
            # is aborted) instead of the watchdog tearing the whole actor down
            with _env(TORCH_NCCL_ASYNC_ERROR_HANDLING="0"):
                group = dist.ProcessGroupNCCL(store, rank, size, opts)
            self._broadcast(group, torch.zeros(1, device=self.device))  # make the communicator now
            return group
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = self.timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.node_ip())]
        return dist.ProcessGroupGloo(store, rank, size, opts)

    def _broadcast(self, group: Any, buffer: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        group.broadcast([buffer], opts).wait(self.timeout)

    def close(self) -> None:
        """Abort the group (a stuck broadcast ends) and release the buffers and the store."""
        if self._sender is not None:
            self._sender.shutdown(wait=False, cancel_futures=True)
            self._sender = None
        group, self.group = self.group, None
        if group is not None:
            for method in ("abort", "shutdown"):  # NCCL: free the communicator now
                if hasattr(group, method):
                    try:
                        getattr(group, method)()
                    except Exception:  # already broken: nothing more to free
                        pass
                    break
        self.buffer, self.store = None, None
        self._sent, self._copies = {}, {}

    def send(self, bucket: int, tensors: Sequence[torch.Tensor]) -> None:
        if self._sender is not None:
            return self._send_overlapped(bucket, tensors)
        flat = flatten_into(self.buffer, self.plan.buckets[bucket], tensors)
        try:
            self._broadcast(self.group, flat)
        except Exception as e:
            self.close()
            raise self._error(f"broadcast bucket {bucket}", e) from None

    def _send_overlapped(self, bucket: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the bucket into its own buffer (once the previous version's broadcast of it
        is done) and queue its broadcast; an earlier broadcast that failed raises here."""
        try:
            for b, fut in list(self._sent.items()):
                if fut.done() or b == bucket:
                    fut.result()  # raises what the broadcast raised
        except Exception as e:
            self.close()
            raise self._error("broadcast an earlier bucket", e) from None
        spec = self.plan.buckets[bucket]
        if bucket not in self._copies:
            self._copies[bucket] = empty_buffer(spec.numel, self.plan.torch_dtype, self.device)
        flat = flatten_into(self._copies[bucket], spec, tensors)
        self._sent[bucket] = self._sender.submit(self._broadcast, self.group, flat)

    def receive(self, handle: WeightHandle, backend: Any) -> None:
        bucket = self.plan.buckets[handle.bucket]
        flat = self.buffer[: bucket.numel]
        try:
            self._broadcast(self.group, flat)
        except Exception as e:
            self.close()
            raise self._error(
                f"receive bucket {handle.bucket} of version {handle.version}", e
            ) from None
        self._load(handle, backend, unflatten(flat, bucket))


@contextmanager
def _env(**values: str):
    """Environment variables set for the block (restored after)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def node_id() -> str:
    """This process's Ray node (empty outside Ray: one process, one node)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def node_ip() -> str:
    """This node's address as Ray knows it (127.0.0.1 outside Ray)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


TRANSPORTS: dict[str, type[WeightTransport]] = {
    "object_store": ObjectStoreTransport,
    "collective": CollectiveTransport,
    "shared_memory": SharedMemoryTransport,
}


def make_transport(plan: SyncPlan) -> WeightTransport:
    if plan.transport == "cuda_ipc":
        # imported here, not at the top (nor listed in TRANSPORTS): sync/cuda_ipc.py
        # imports WeightTransport from this module
        from rlalign_ray.sync.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(plan)
    return TRANSPORTS[plan.transport](plan)
