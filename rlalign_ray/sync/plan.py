"""What both sides of a weight sync agree on, and what the driver hands each generator per
bucket: plain data, no torch, so that an actor which only receives them (a simulated
generator in ``rlalign_ray.bench``) need not import torch to unpickle them.
``sync/buckets.py`` and ``sync/transports.py`` re-export these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


# In-flight weight updates (rollout.inflight_updates): the Ray concurrency group of a
# generator actor in which its loads run, beside the chunk it samples (rollout/inflight.py)
WEIGHTS_GROUP = "weights"


@dataclass(frozen=True)
class Bucket:
    """Parameters that travel together, laid out back to back in a flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # element offset of each parameter in the flat buffer
    numel: int  # elements in the flat buffer


@dataclass(frozen=True)
class SyncPlan:
    """Everything both sides of a sync agree on before the first version travels."""

    transport: str  # collective | cuda_ipc | shared_memory | object_store (resolved)
    backend: str  # collective: gloo | nccl (resolved from auto)
    dtype: str  # the generators' dtype: weights travel in it
    buckets: tuple[Bucket, ...]
    timeout_s: float
    # collective: learner rank 0 plus every generator's ranks (a vLLM engine's
    # tensor-parallel workers each join with a rank of their own)
    world_size: int
    # cuda_ipc: generator i reads from learner rank owners[i], the rank on its GPU
    owners: tuple[int, ...] = ()
    # collective: the sender keeps a copy of every bucket and broadcasts from a thread, so
    # a publish returns at once (pipelined training: generators join when their chunk ends)
    overlap: bool = False

    def sends(self, rank: int) -> bool:
        """Whether learner rank ``rank`` sends (rank 0; with cuda_ipc each rank that owns a
        generator's GPU)."""
        return rank in self.owners if self.transport == "cuda_ipc" else rank == 0

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def num_bytes(self) -> int:
        return sum(b.numel for b in self.buckets) * self.torch_dtype.itemsize

    @property
    def max_numel(self) -> int:
        return max(b.numel for b in self.buckets)


@dataclass
class WeightHandle:
    """What the driver passes to every generator for one bucket of one version."""

    version: int
    bucket: int
    # object store and shared memory: [ref of rank 0's publish call] (a list: Ray passes it
    # on unresolved), or [its result] once ``resolve`` fetched it; None: not needed
    payload: Any = None

    def is_last(self, plan: SyncPlan) -> bool:
        return self.bucket == len(plan.buckets) - 1

    def published(self, timeout_s: float | None = None, rank: int = 0) -> Any:
        """What learner rank ``rank``'s publish call returned for this bucket (waiting for
        it; only cuda_ipc hands generators more than rank 0's)."""
        value = self.payload[rank]
        if not type(value).__module__.startswith("ray"):
            return value  # resolved already (or handed over without Ray)
        import ray

        return ray.get(value, timeout=timeout_s)

    def resolve(self, timeout_s: float | None = None) -> WeightHandle:
        """This handle with the publish calls' results in place of their refs. A dispatcher
        resolves it once for its group: the refs belong to the driver, which answers every
        process that fetches one (one request per generator, at the driver, otherwise). A
        generator resolves it for its engine's workers, which cannot ask Ray."""
        if not self.payload:
            return self
        values = [self.published(timeout_s, r) for r in range(len(self.payload))]
        return replace(self, payload=values)


def gpu_uuids() -> list[str]:
    """This process's GPUs by UUID, its current device first (the one it holds weights
    on; then the others it sees: a tensor-parallel engine's workers use them in order);
    [] without one. Torch-free unless the process already imported torch (an actor that
    holds no torch weights holds none on a GPU either)."""
    import os
    import sys

    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or "torch" not in sys.modules:
        return []
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return []
    first = torch.cuda.current_device()
    order = [first, *(i for i in range(torch.cuda.device_count()) if i != first)]
    return [str(torch.cuda.get_device_properties(i).uuid) for i in order]


def duplicate_gpus(members: dict[str, list[str]]) -> dict[str, list[str]]:
    """GPU UUID -> the members (by label) that would hold a rank on it, for every GPU
    two members share. ``members``: label -> the GPUs its ranks use."""
    seen: dict[str, list[str]] = {}
    for label, uuids in members.items():
        for u in dict.fromkeys(uuids):
            seen.setdefault(u, []).append(label)
    return {u: labels for u, labels in seen.items() if len(labels) > 1}
