"""The reference model: frozen log-probs for the KL term."""

from __future__ import annotations

import torch

from rlalign_ray.config import ModelConfig, ReferenceConfig
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.data.packing import token_groups
from rlalign_ray.models.loading import (
    batch_logprobs,
    default_device,
    load_causal_lm,
    set_threads,
)
from rlalign_ray.models.packing_probe import use_packing


class Reference:
    def __init__(self, model: ModelConfig, cfg: ReferenceConfig, temperature: float):
        set_threads(cfg.resources.num_cpus)
        self.device = default_device(cfg.resources.num_gpus, "reference.resources.num_gpus")
        path = model.reference or model.path
        self.model = (
            load_causal_lm(
                path, model.dtype, model.trust_remote_code, False, model.attn_implementation
            )
            .to(self.device)
            .eval()
        )
        self.temperature = temperature
        self.micro_batch_size = cfg.micro_batch_size
        self.chunk_size = cfg.logprob_chunk_size
        self.budget = cfg.max_tokens_per_micro_batch
        self.packing = cfg.packing and use_packing(self.model, self.device, "reference.packing")

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) reference log-probs of the sampled response tokens: ``micro_batch_size``
        rows per forward, or with a token budget as many as fit it
        (``data.packing.token_groups``), packed or padded."""
        groups = None
        if self.budget:
            plen, rlen = batch.prompt_mask.sum(1), batch.response_len
            groups = [torch.tensor(g) for g in token_groups(plen, rlen, self.budget, self.packing)]
        return batch_logprobs(
            self.model,
            batch,
            self.temperature,
            self.micro_batch_size,
            self.device,
            self.chunk_size,
            groups=groups,
            packed=self.packing,
        )

    def ping(self) -> int:
        return 0
