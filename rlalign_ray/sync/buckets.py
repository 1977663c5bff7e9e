"""Weights cut into buckets: which parameters travel together, and flat buffers for them.

Pure tensor code (no Ray). A bucket is a run of parameters, in the model's order, whose
bytes in the generator's dtype add up to about ``bucket_mb``; one parameter larger than
that travels alone. Flat buffers hold a bucket's parameters back to back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from rlalign_ray.errors import WeightSyncError
from rlalign_ray.sync.plan import Bucket, SyncPlan  # noqa: F401 (defined there, torch-free)


def plan_buckets(
    layout: Sequence[tuple[str, Sequence[int]]], dtype: torch.dtype, bucket_bytes: int
) -> tuple[Bucket, ...]:
    """Cut ``(name, shape)`` pairs, in order, into buckets of at most ``bucket_bytes``.

    A model's layer (the parameters under one ``...layers.N.`` prefix) is never split: vLLM
    processes a layer once all of its weights have arrived (fused q/k/v and gate/up, CPU
    repacking), so each bucket can be loaded on its own, without holding the others. A
    layer (or a parameter) larger than a bucket gets a bucket of its own."""
    if not layout:
        raise ValueError("the model has no parameters to sync")
    limit = max(1, bucket_bytes // dtype.itemsize)
    buckets, current = [], []

    def close() -> None:
        offsets = np.cumsum([0] + [math.prod(s) for _, s in current]).tolist()
        names, shapes = zip(*current)
        buckets.append(Bucket(names, shapes, tuple(offsets[:-1]), offsets[-1]))
        current.clear()

    used = 0
    for group in _layers(layout):
        n = sum(math.prod(shape) for _, shape in group)
        if current and used + n > limit:
            close()
            used = 0
        current.extend((name, tuple(int(d) for d in shape)) for name, shape in group)
        used += n
    close()
    return tuple(buckets)


_LAYER = re.compile(r"^(.*?\.\d+)\.")  # model.layers.3.mlp.up_proj.weight -> model.layers.3


def _layers(layout: Sequence[tuple[str, Sequence[int]]]) -> list[list]:
    """Consecutive parameters grouped by their numbered layer (others alone)."""
    groups: list[list] = []
    last = None
    for name, shape in layout:
        m = _LAYER.match(name)
        key = m.group(1) if m else None
        if key is not None and key == last:
            groups[-1].append((name, shape))
        else:
            groups.append([(name, shape)])
        last = key
    return groups


HALF_MAX = torch.finfo(torch.float16).max  # 65504


def check_half_range(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Weights about to travel in float16 (the generators' dtype) from a learner that holds
    them in bfloat16 or float32: refuse any value beyond float16's range, which the cast
    would turn into inf in every generator. One device sync per bucket."""
    wider = [(n, t.detach()) for n, t in zip(names, tensors) if t.dtype != torch.float16]
    wider = [(n, t) for n, t in wider if t.numel()]
    if not wider:
        return
    peaks = torch.stack([t.abs().max().float() for _, t in wider]).cpu()
    if not bool((peaks > HALF_MAX).any()):
        return
    name, peak = max(zip([n for n, _ in wider], peaks.tolist()), key=lambda x: x[1])
    raise WeightSyncError(
        f"weight sync: {name} holds {peak:.4g}, beyond float16's range ({HALF_MAX:g}); the "
        "generators (rollout.dtype, or model.dtype: float16) would get inf. Set "
        "rollout.dtype: bfloat16 (the learner's range) or float32"
    )


def empty_buffer(
    numel: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A flat buffer whose pages are already touched (a fresh page costs far more to write
    than a reused one), to be reused for every bucket and version."""
    return torch.empty(numel, dtype=dtype, device=device).zero_()


def flatten_into(
    buffer: torch.Tensor, bucket: Bucket, tensors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Copy (and cast) a bucket's tensors into the front of ``buffer``; returns that part."""
    for view, t in zip(unflatten(buffer, bucket), tensors):
        view.copy_(t.detach().reshape(view.shape))
    return buffer[: bucket.numel]


def unflatten(buffer: torch.Tensor, bucket: Bucket) -> list[torch.Tensor]:
    """Views of a flat buffer shaped as the bucket's parameters (no copy)."""
    return [buffer[o : o + math.prod(s)].view(s) for o, s in zip(bucket.offsets, bucket.shapes)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 (which numpy lacks) is bit-cast to int16."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``to_numpy`` made, back in ``dtype`` (a view, no copy)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
