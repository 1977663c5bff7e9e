"""Loading Hugging Face models and computing per-token log-probs of responses."""

from __future__ import annotations

import os
from typing import Any

import torch

from rlalign_ray.data.batch import RolloutBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(path: str) -> str:
    """Resolve ``builtin:NAME`` paths (built and cached on first use); others unchanged."""
    if not path.startswith("builtin:"):
        return path
    from rlalign_ray.models.builtin import resolve_model_path

    return resolve_model_path(path)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return model


def default_device() -> torch.device:
    """The GPU Ray assigned to this actor (it sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "":
        return torch.device("cuda", 0)
    return torch.device("cpu")


def set_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs Ray gave this actor."""
    torch.set_num_threads(max(1, int(num_cpus)))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model: Any, batch: RolloutBatch, device: torch.device) -> torch.Tensor:
    """(B, T, V) logits that predict each response token."""
    ids = batch.input_ids().to(device)
    attn = batch.attention_mask().to(device)
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False
    )
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    return out.logits[:, p - 1 : p + t - 1, :]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens]: (B, T, V), (B, T) -> (B, T)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logz


@torch.no_grad()
def batch_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float,
    micro_batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens, micro-batched, zero on padding."""
    outs = []
    for start in range(0, len(batch), micro_batch_size):
        mb = batch.select(list(range(start, min(start + micro_batch_size, len(batch)))))
        logits = response_logits(model, mb, device)
        lp = token_logprobs(logits, mb.response_ids.to(device), temperature)
        outs.append((lp * mb.response_mask.to(device)).cpu())
    return torch.cat(outs)
