"""The CUDA IPC weight transport (``sync.transport: cuda_ipc``): colocated layouts.

Generators that share a learner rank's GPU (``placement.colocate_with: learner``) open that
rank's GPU buffer of a bucket through CUDA IPC and load from it in place. The base class,
the other transports and ``make_transport`` (which imports this module when a plan asks
for ``cuda_ipc``) are in ``sync/transports.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlalign_ray.errors import WeightSyncError
from rlalign_ray.sync.buckets import flatten_into, unflatten
from rlalign_ray.sync.plan import SyncPlan, WeightHandle
from rlalign_ray.sync.transports import WeightTransport


class CudaIpcTransport(WeightTransport):
    """Generators that share a learner rank's GPU (``placement.colocate_with: learner``)
    read that rank's weights through CUDA IPC: the rank copies a bucket into a GPU buffer
    and publishes its IPC handle; the generator opens it, on the same GPU, and loads from
    it in place (no host memory, no NCCL, which refuses two ranks on one GPU). Each learner
    rank serves the generators on its own GPU (``plan.owners``), so a colocated layout of
    N ranks and N generators syncs in parallel. A rank keeps the buffers of a version until
    every generator holds it (the driver then calls ``release``), so between syncs the
    learner's GPU holds no second copy of the weights."""

    name = "cuda_ipc"

    def __init__(self, plan: SyncPlan):
        super().__init__(plan)
        self.live: dict[int, torch.Tensor] = {}  # bucket -> the buffer its handle points at
        self.owner = 0

    def connect(self, address: Any, rank: int) -> None:
        super().connect(address, rank)
        if rank:
            self.owner = self.plan.owners[rank - 1]

    def close(self) -> None:
        self.live = {}

    def release(self) -> None:
        """Free the buffers (every generator has copied them into its engine) and hand the
        memory back to the driver, for the generators' engines to wake into."""
        self.live = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.ipc_collect()  # blocks that receivers have closed
            torch.cuda.empty_cache()

    def send(self, bucket: int, tensors: Sequence[torch.Tensor]) -> Any:
        from torch.multiprocessing.reductions import reduce_tensor

        spec = self.plan.buckets[bucket]
        device = tensors[0].device
        if device.type != "cuda":
            raise WeightSyncError(
                "cuda_ipc weight sync: a learner rank holds its weights on "
                f"{device}, not a GPU; use sync.transport: auto"
            )
        self.live.pop(bucket, None)  # not released yet: every generator holds its version
        flat = torch.empty(spec.numel, dtype=self.plan.torch_dtype, device=device)
        self.live[bucket] = flatten_into(flat, spec, tensors)
        return reduce_tensor(self.live[bucket])

    def receive(self, handle: WeightHandle, backend: Any) -> None:
        rebuild, args = self._published(handle, "get", self.owner)
        try:
            flat = rebuild(*args)
        except RuntimeError as e:
            raise self._error(
                f"open learner rank {self.owner}'s CUDA IPC buffer (is this generator on the "
                "same GPU?)",
                e,
            ) from None
        self._load(handle, backend, unflatten(flat, self.plan.buckets[handle.bucket]))
        del flat
