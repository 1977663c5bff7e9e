"""Masked reductions, loss aggregation and entropy shared by the RL objectives.

Shape convention: ``B`` sequences, ``T`` response tokens. ``mask`` is a float tensor of
the same shape as the data, 1.0 on tokens that count and 0.0 on padding or on masked
observation tokens inside a response.
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def _safe_count(count: torch.Tensor) -> torch.Tensor:
    """Replace zero counts by one so that an all-masked reduction returns 0, not NaN."""
    return torch.where(count > 0, count, torch.ones_like(count))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    Shapes: ``x`` and ``mask`` broadcastable to the same shape; ``dim=None`` reduces to a
    scalar, otherwise reduces over ``dim``.
    Formula: ``sum(x * mask) / sum(mask)``; an empty mask gives 0 (not NaN). Values of
    ``x`` at masked positions are zeroed first, so inf/NaN there cannot leak in.
    """
    mask = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    x = torch.where(mask != 0, x, torch.zeros_like(x))
    if dim is None:
        return (x * mask).sum() / _safe_count(mask.sum())
    return (x * mask).sum(dim) / _safe_count(mask.sum(dim))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalise ``x`` to zero mean, unit variance over all masked elements of the batch.

    Shapes: ``x`` and ``mask`` are ``(B, T)`` (any shape works); returns ``x``'s shape.
    Formula: ``mean = masked_mean(x)``, ``var = sum(mask * (x - mean)^2) / (n - 1)``
    (unbiased, ``n = sum(mask)``; ``n <= 1`` gives ``var = 0``), output
    ``(x - mean) * rsqrt(var + 1e-8)``. Masked positions are NOT zeroed: multiply by the
    mask afterwards. Used for advantage whitening in PPO (Schulman et al. 2017) and
    REINFORCE++ (Hu 2025).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    centered = torch.where(mask != 0, x - mean, torch.zeros_like(x))
    n = mask.sum()
    dof = torch.where(n > 1, n - 1, torch.ones_like(n))
    var = (centered.pow(2) * mask).sum() / dof
    return (x - mean) * torch.rsqrt(var + 1e-8)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    norm_len: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss matrix to a scalar.

    Shapes: ``loss_mat`` and ``mask`` are ``(B, T)``; returns a 0-dim tensor.
    Modes (``S_i = sum_t m_it * l_it``, ``n_i = sum_t m_it``, means over sequences skip
    rows with ``n_i = 0``):

    * ``token-mean``: ``sum_i S_i / sum_i n_i`` (DAPO, Yu et al. 2025, token-level loss).
    * ``token-sum``: ``sum_i S_i`` (divide by a global token count yourself to make
      micro-batch accumulation exact).
    * ``seq-mean-token-sum``: ``mean_i S_i``.
    * ``seq-mean-token-mean``: ``mean_i S_i / n_i`` (GRPO, Shao et al. 2024).
    * ``seq-mean-token-sum-norm``: ``mean_i S_i / norm_len`` with ``norm_len`` default
      ``T`` (Dr.GRPO, Liu et al. 2025: a constant instead of the sequence length).

    An all-masked input returns 0 while keeping the autograd graph. Unknown ``mode``
    raises ``ValueError``.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"unknown loss aggregation mode {mode!r}; valid modes: {AGGREGATION_MODES}"
        )
    mask = mask.to(loss_mat.dtype)
    masked = torch.where(mask != 0, loss_mat, torch.zeros_like(loss_mat)) * mask
    if mode == "token-sum":
        return masked.sum()
    if mode == "token-mean":
        return masked.sum() / _safe_count(mask.sum())
    seq_sum = masked.sum(-1)
    seq_count = mask.sum(-1)
    if mode == "seq-mean-token-sum":
        per_seq = seq_sum
    elif mode == "seq-mean-token-mean":
        per_seq = seq_sum / _safe_count(seq_count)
    else:
        per_seq = seq_sum / float(loss_mat.shape[-1] if norm_len is None else norm_len)
    valid = (seq_count > 0).to(loss_mat.dtype)
    return (per_seq * valid).sum() / _safe_count(valid.sum())


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension.

    Shapes: ``logits`` is ``(..., V)``; returns ``(...)``.
    Formula: ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``, which avoids taking the log
    of small probabilities; ``-inf`` logits (banned tokens) contribute 0.
    """
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits))
    return lse - weighted.sum(-1)
