"""What both sides of a weight sync agree on, and what the driver hands each generator per
bucket: plain data, no torch, so that an actor which only receives them (a simulated
generator in ``rlalign_ray.bench``) need not import torch to unpickle them.
``sync/buckets.py`` and ``sync/weights.py`` re-export these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    # object store and shared memory: [ref of rank 0's publish call] (a list: Ray passes it
    # on unresolved), or [its result] once ``resolve`` fetched it; None: not needed
    payload: Any = None

    def is_last(self, plan: SyncPlan) -> bool:
        return self.bucket == len(plan.buckets) - 1

    def published(self, timeout_s: float | None = None) -> Any:
        """What rank 0's publish call returned for this bucket (waiting for it)."""
        import ray

        value = self.payload[0]
        return ray.get(value, timeout=timeout_s) if isinstance(value, ray.ObjectRef) else value

    def resolve(self) -> WeightHandle:
        """This handle with the publish call's result in place of its ref. A dispatcher
        resolves it once for its group: the ref belongs to the driver, which answers every
        process that fetches it (one request per generator, at the driver, otherwise)."""
        return replace(self, payload=[self.published()]) if self.payload else self
