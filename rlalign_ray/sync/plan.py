"""What both sides of a weight sync agree on, and what the driver hands each generator per
bucket: plain data, no torch, so that an actor which only receives them (a simulated
generator in ``rlalign_ray.bench``) need not import torch to unpickle them.
``sync/buckets.py`` and ``sync/weights.py`` re-export these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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

    transport: str  # collective | shared_memory | object_store (resolved from auto)
    backend: str  # collective: gloo | nccl (resolved from auto)
    dtype: str  # the generators' dtype: weights travel in it
    buckets: tuple[Bucket, ...]
    timeout_s: float
    world_size: int  # learner rank 0 plus every generator

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
    payload: Any = None  # object store: [ref of rank 0's publish call] (a list: Ray passes it on)

    def is_last(self, plan: SyncPlan) -> bool:
        return self.bucket == len(plan.buckets) - 1
