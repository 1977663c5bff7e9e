"""Generation backends: turn token prompts into sampled responses with their log-probs.

``HFBackend`` uses transformers' ``generate`` (batched, KV cache). A vLLM backend
implements the same three methods on GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from rlalign_ray.data.batch import pad_prompts
from rlalign_ray.models.loading import token_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Generation:
    """Responses for a batch of prompts, right-padded."""

    tokens: torch.Tensor  # (N, T) long, pad after the end
    lengths: torch.Tensor  # (N,) long, generated tokens including EOS when emitted
    logprobs: torch.Tensor  # (N, T) float, log-prob of each sampled token, 0 on padding
    truncated: torch.Tensor  # (N,) bool, stopped by max_new_tokens


class GenerationBackend(ABC):
    @abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generation:
        """Sample one response per prompt (repeat prompts for several samples)."""

    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The module whose parameters receive weight updates."""


class HFBackend(GenerationBackend):
    def __init__(self, model: Any, tokenizer: Any, device: torch.device):
        self._model = model.to(device).eval()
        self.tok = tokenizer
        self.device = device
        self.eos_ids = _eos_ids(model, tokenizer)

    def model(self) -> torch.nn.Module:
        return self._model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generation:
        pad = self.tok.pad_token_id
        ids, attn = pad_prompts(prompts, pad)
        width = ids.shape[1]
        greedy = params.temperature == 0
        out = self._model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=self.eos_ids,
            return_dict_in_generate=True,
            output_logits=True,
        )
        tokens = out.sequences[:, width:].cpu()
        temp = 1.0 if greedy else params.temperature
        lp = torch.stack(  # per step, so no (N, T, V) copy is made
            [
                token_logprobs(step[:, None, :], tokens[:, i : i + 1].to(step.device), temp)[:, 0]
                for i, step in enumerate(out.logits)
            ],
            dim=1,
        ).cpu()
        lengths, truncated = _lengths(tokens, self.eos_ids)
        keep = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        tokens = tokens.masked_fill(~keep, pad)
        return Generation(tokens, lengths, lp * keep, truncated)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _lengths(tokens: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response length up to and including the first EOS; whether none was emitted."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= tokens == e
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, 0).long())
    lengths = torch.where(has_eos, first + 1, torch.full_like(first, tokens.shape[1]))
    return lengths, ~has_eos


BACKENDS = {"hf": HFBackend}
