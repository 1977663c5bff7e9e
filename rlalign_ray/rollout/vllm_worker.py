"""The part of the vLLM backend that runs inside vLLM's workers: a worker extension.

vLLM adds the methods of ``WeightReceiver`` to every worker of an engine
(``LLM(worker_extension_cls=...)``); the generator calls them with ``collective_rpc`` and
passes only small descriptions (the sync plan, a bucket's handle). Each worker then joins
the weight sync as a receiver of its own: over a collective it takes a rank of its own and
receives every broadcast on its own GPU; over shared memory it maps the segment itself;
over CUDA IPC it opens the learner's buffer. It loads each bucket with vLLM's in-place
``reload_weights``, which keeps that worker's tensor-parallel shard. So nothing as large as
a bucket is ever pickled between processes: with ``tensor_parallel_size`` > 1 no worker
holds more than one bucket (plus the shard being loaded), whatever the model's size.

With one worker (``tensor_parallel_size: 1``) vLLM runs it in the generator's process
(``distributed_executor_backend: uni``): the same code, without a process boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class WeightReceiver:
    """vLLM worker extension: the worker's end of the weight sync. Method names carry a
    prefix, as vLLM refuses an extension that shadows a worker attribute."""

    _rlalign_sync: Any = None  # this worker's end of the transport
    _rlalign_repack = False  # re-pack the LM head after a version (CPU, tied embeddings)

    def rlalign_join_weight_sync(
        self, plan: Any, address: Any, first_rank: int, place: tuple, who: str, repack: bool
    ) -> int:
        """Join the sync as ``first_rank`` + this worker's tensor-parallel rank (``place``:
        the generator's Ray node id and IP, which this process cannot ask Ray for); returns
        the rank taken."""
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        from rlalign_ray.sync.transports import make_transport

        self.rlalign_close_weight_sync()
        k = get_tensor_model_parallel_rank()
        transport = make_transport(plan)
        transport.node, transport.ip = place
        tp = get_tensor_model_parallel_world_size()
        transport.who = f"{who} (tensor-parallel worker {k})" if tp > 1 else who
        transport.connect(address, first_rank + k)
        self._rlalign_sync, self._rlalign_repack = transport, repack
        return first_rank + k

    def rlalign_load_weights(self, handle: Any) -> None:
        """Receive one bucket (its handle resolved by the generator) and load it in place."""
        self._rlalign_sync.receive(handle, _EngineModel(self, self._rlalign_repack))

    def rlalign_close_weight_sync(self) -> None:
        if self._rlalign_sync is not None:
            self._rlalign_sync.close()
            self._rlalign_sync = None


class _EngineModel:
    """What a transport loads a bucket into inside one worker (a ``GenerationBackend``'s
    loading half)."""

    def __init__(self, worker: Any, repack: bool):
        self.worker, self.repack = worker, repack

    def can_share(self, dtype: torch.dtype) -> bool:
        return False  # vLLM holds its weights in its own layout

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # vLLM's in-place reload processes a layer once all of its weights have arrived
        # (q/k/v and gate/up are fused; the CPU kernels repack) and keeps the layers it was
        # not given. Buckets never split a layer (``plan_buckets``), so each bucket is
        # loaded as it arrives, read in place.
        self.worker.reload_weights(weights_iterator=list(weights), is_checkpoint_format=True)

    def finish_weight_update(self) -> None:
        if self.repack:
            repack_lm_head(self.worker)


def repack_lm_head(worker: Any) -> None:
    """On CPU vLLM packs the LM head's weight for its GEMM kernel. With tied embeddings an
    in-place reload refills the shared embedding but not that packed copy (vLLM 0.32), so
    logits would still come from the old weights: pack it again (runs in each worker)."""
    head = worker.model_runner.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)
