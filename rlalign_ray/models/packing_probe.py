"""Whether a model can train on packed rows (``data/packing.py``): a probe that runs three
short rows packed and padded and compares them, run by every role with packing on at setup."""

from __future__ import annotations

import logging
from typing import Any

import torch

from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.models.loading import hf_model, packed_response_hidden, response_hidden


@torch.no_grad()
def packing_problem(model: Any, device: torch.device) -> str | None:
    """Why packed rows would not give ``model`` the padded rows' results (None: they do).

    Runs three short rows packed as training packs them (``pack_for``; two of them share a
    sequence) and padded: the hidden states before their response tokens must agree (to
    float rounding of the model's dtype). A model or attention kernel that ignores packed
    position ids would let a row attend to its neighbour, or give it the wrong positions.
    Every rank of a ZeRO-3 group must call it (it runs forwards)."""
    hf = hf_model(model)
    batch = _probe_batch(
        int(getattr(hf.config, "vocab_size", 0) or 2), getattr(hf.config, "pad_token_id", 0)
    )
    training = hf.training
    hf.eval()
    try:
        packed = packed_response_hidden(model, batch, device).float()
        padded = response_hidden(model, batch, device)[batch.response_mask.to(device) != 0].float()
    except Exception as e:  # noqa: BLE001 (any failure means: do not pack)
        return f"a packed forward failed ({type(e).__name__}: {e})"
    finally:
        hf.train(training)
    tol = 1e-3 if next(hf.parameters()).dtype == torch.float32 else 5e-2
    err = float((packed - padded).abs().max() / padded.abs().max().clamp(min=1e-6))
    if not err <= tol:
        impl = getattr(hf.config, "_attn_implementation", None)
        return (
            f"{type(hf).__name__} (attention {impl!r}) lets packed rows see each other or "
            f"ignores their position ids (relative difference {err:.2g} from padded rows)"
        )
    return None


def _probe_batch(vocab: int, pad_id: int | None) -> RolloutBatch:
    """Rows of 2 prompt + 6, 3 and 1 response tokens (random ids): packed in bins of the
    longest row, the second and third share one."""
    g = torch.Generator().manual_seed(0)
    rlen = torch.tensor([6, 3, 1])
    mask = (torch.arange(6)[None, :] < rlen[:, None]).float()
    return RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (3, 2), generator=g),
        prompt_mask=torch.ones(3, 2, dtype=torch.long),
        response_ids=torch.randint(0, vocab, (3, 6), generator=g) * mask.long(),
        response_len=rlen,
        response_mask=mask,
        logprobs=torch.zeros(3, 6),
        version=0,
        group_ids=torch.arange(3),
        prompts=[""] * 3,
        completions=[""] * 3,
        columns={},
        pad_id=pad_id or 0,
    )


def use_packing(model: Any, device: torch.device, key: str) -> bool:
    """Whether the role whose ``key`` (``learner.packing``, ...) is on can pack ``model``'s
    rows; if not, a warning says why and the role runs padded rows (the same results)."""
    problem = packing_problem(model, device)
    if problem:
        logging.getLogger("rlalign_ray").warning(
            "%s: %s; running padded micro-batches instead (the same results, more compute)",
            key,
            problem,
        )
    return problem is None
