"""Weight broadcast from learner rank 0 to the generators, versioned.

A ``WeightTransport`` has two halves: ``publish`` runs on learner rank 0 and returns a
small ``WeightHandle``; ``receive`` runs in each generator and copies the weights into the
model's own (preallocated) parameters. The object-store transport below puts the weights
once (a dict of numpy arrays, which receivers read zero-copy), so the cost on the learner
does not grow with the number of generators. A collective (gloo/NCCL group) transport
implements the same two methods.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class WeightHandle:
    """What the driver passes from the learner to every generator."""

    version: int
    payload: Any  # transport-specific (an ObjectRef wrapped in a list for the object store)
    dtypes: dict[str, str] = field(
        default_factory=dict
    )  # name -> torch dtype (bf16 travels as int16)
    num_bytes: int = 0


class WeightTransport(ABC):
    @abstractmethod
    def publish(
        self, named_params: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightHandle:
        """Learner side: make ``named_params`` available to receivers once."""

    @abstractmethod
    def receive(self, handle: WeightHandle, backend: Any) -> int:
        """Generator side: load the published weights through ``backend.load_weights``
        (a ``GenerationBackend``); return the version."""


class ObjectStoreTransport(WeightTransport):
    """One ``ray.put`` of numpy arrays; receivers ``copy_`` into their parameters."""

    def publish(
        self, named_params: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightHandle:
        import ray

        arrays, dtypes, nbytes = {}, {}, 0
        for name, t in named_params:
            arr, dtype = to_numpy(t)
            arrays[name], dtypes[name] = arr, dtype
            nbytes += arr.nbytes
        ref = ray.put(arrays)
        # Wrapped in a list so Ray passes the ref through actor calls instead of resolving it.
        return WeightHandle(version=version, payload=[ref], dtypes=dtypes, num_bytes=nbytes)

    def receive(self, handle: WeightHandle, backend: Any) -> int:
        import ray

        arrays = ray.get(handle.payload[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy arrays
            backend.load_weights(
                (n, from_numpy(a, handle.dtypes.get(n, ""))) for n, a in arrays.items()
            )
        backend.finish_weight_update()
        return handle.version


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU numpy view of a tensor; bfloat16 travels bit-cast as int16."""
    t = t.detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy(), dtype


def from_numpy(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


@torch.no_grad()
def load_arrays(
    model: torch.nn.Module, arrays: dict[str, np.ndarray], dtypes: dict[str, str]
) -> None:
    """Copy published arrays into the model's parameters, in place; names must match."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    if missing or unexpected:
        raise ValueError(f"weight names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy arrays
        for name, arr in arrays.items():
            src = torch.from_numpy(arr)
            if dtypes.get(name) == "bfloat16":
                src = src.view(torch.bfloat16)
            dst = params[name]
            if dst.shape != src.shape:
                raise ValueError(f"{name}: shape {tuple(src.shape)} != model's {tuple(dst.shape)}")
            dst.copy_(src)


TRANSPORTS: dict[str, type[WeightTransport]] = {"object_store": ObjectStoreTransport}
