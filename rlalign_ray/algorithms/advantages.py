"""Advantage estimators: GAE, GRPO / Dr.GRPO, RLOO, REINFORCE++ and reward shaping.

Shape convention: ``B`` sequences, ``T`` response tokens, ``mask`` float ``(B, T)`` with
1.0 on tokens that count. Group labels are integers in any order with groups of any size.
"""

from __future__ import annotations

import torch

from .utils import masked_whiten


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


def _group_sums(scores: torch.Tensor, group_ids: torch.Tensor):
    """Per-sample group size and group sum, gathered back to shape ``(B,)``.

    Returns ``(inverse, count_g, sum_g)`` where ``inverse`` maps each sample to a dense
    group index and the two others are per-group tensors of shape ``(G,)``.
    """
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = uniq.numel()
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    count = count.index_add(0, inverse, torch.ones_like(scores))
    total = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    total = total.index_add(0, inverse, scores)
    return inverse, count, total


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016).

    Shapes: ``token_rewards``, ``values``, ``mask`` are ``(B, T)``; returns
    ``(advantages, returns)``, both ``(B, T)``.
    Formula over the valid tokens ``t`` of a row (with ``t'`` the next valid token, and
    ``V(t') = 0`` after the last one): ``delta_t = r_t + gamma * V(t') - V(t)``,
    ``A_t = delta_t + gamma * lam * A_t'``. Masked positions are skipped: their reward
    and value are ignored, the next value and running advantage carry across them, and
    their advantage is 0. ``returns = advantages + values``. No whitening here.
    """
    mask = mask.to(values.dtype)
    batch, length = values.shape
    next_value = values.new_zeros(batch)
    running = values.new_zeros(batch)
    advantages = []
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        advantages.append(candidate * m)
        running = m * candidate + (1.0 - m) * running
        next_value = m * values[:, t] + (1.0 - m) * next_value
    adv = torch.stack(advantages[::-1], dim=1)
    return adv, adv + values


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative outcome advantages: GRPO and Dr.GRPO.

    Shapes: ``scores`` ``(B,)``, ``group_ids`` ``(B,)`` integer labels; returns ``(B,)``.
    GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g) / (std_g + eps)`` with
    the unbiased (n - 1) std of the sample's group. Dr.GRPO (Liu et al. 2025):
    ``scale_by_std=False`` gives ``A_i = r_i - mean_g``. A group of one sample gets 0.
    """
    scores = _float(scores)
    inverse, count, total = _group_sums(scores, group_ids)
    mean = (total / count)[inverse]
    adv = scores - mean
    if scale_by_std:
        sq = torch.zeros_like(count).index_add(0, inverse, adv.pow(2))
        var = sq / torch.clamp(count - 1.0, min=1.0)
        adv = adv / (var.sqrt()[inverse] + eps)
    return torch.where(count[inverse] > 1, adv, torch.zeros_like(adv))


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024).

    Shapes: ``scores`` ``(B,)``, ``group_ids`` ``(B,)``; returns ``(B,)``.
    Formula: ``A_i = r_i - (sum_g - r_i) / (n_g - 1)``, the baseline being the mean of
    the other samples of the group. A group of one sample gets 0.
    """
    scores = _float(scores)
    inverse, count, total = _group_sums(scores, group_ids)
    n = count[inverse]
    baseline = (total[inverse] - scores) / torch.clamp(n - 1.0, min=1.0)
    return torch.where(n > 1, scores - baseline, torch.zeros_like(scores))


def _returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float):
    """``G_t = r_t + gamma * G_t'`` over valid tokens (``t'`` next valid), 0 when masked."""
    mask = mask.to(token_rewards.dtype)
    running = token_rewards.new_zeros(token_rewards.shape[0])
    out = []
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t]
        running = m * (token_rewards[:, t] + gamma * running) + (1.0 - m) * running
        out.append(running * m)
    return torch.stack(out[::-1], dim=1)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025).

    Shapes: ``token_rewards`` and ``mask`` ``(B, T)``; returns ``(B, T)``.
    Formula: discounted return-to-go ``G_t = r_t + gamma * G_t'`` (``t'`` the next valid
    token; masked positions are skipped and hold 0), then whitened over every valid token
    of the batch: ``A = masked_whiten(G, mask) * mask``.
    """
    token_rewards = _float(token_rewards)
    returns = _returns_to_go(token_rewards, mask, gamma)
    return masked_whiten(returns, mask) * mask.to(returns.dtype)


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """REINFORCE++-baseline advantages (Hu 2025).

    Shapes: ``scores`` ``(B,)``, ``group_ids`` ``(B,)``, ``mask`` ``(B, T)``; returns
    ``(B, T)``.
    Formula: ``c_i = r_i - mean_g`` (group-mean baseline, no std scaling), broadcast over
    the response tokens, then ``A = masked_whiten(c * mask, mask) * mask`` (batch-level
    normalisation instead of GRPO's per-group std).
    """
    centered = group_advantages(scores, group_ids, scale_by_std=False)
    mask = mask.to(centered.dtype)
    return masked_whiten(centered[:, None] * mask, mask) * mask


def compute_token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Turn sequence scores into per-token rewards ("KL in reward", Ziegler et al. 2019).

    Shapes: ``scores`` ``(B,)``, ``mask`` ``(B, T)``, ``kl`` ``(B, T)`` or None; returns
    ``(B, T)``.
    Formula: ``r_t = score * [t is the last valid token] - kl_coef * kl_t * mask_t``.
    A row with no valid token receives nothing.
    """
    scores = _float(scores)
    mask = mask.to(scores.dtype)
    length = mask.shape[1]
    positions = torch.arange(1, length + 1, device=mask.device, dtype=mask.dtype)
    last = torch.argmax(positions * (mask != 0).to(mask.dtype), dim=1, keepdim=True)
    has_token = (mask.sum(1) > 0).to(scores.dtype)
    rewards = torch.zeros_like(mask).scatter(1, last, (scores * has_token)[:, None])
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * kl * mask
    return rewards


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13).

    Shapes: ``response_lengths`` ``(B,)``; returns ``(B,)`` float, to add to the scores.
    Formula with ``L = length``, ``start = max_len - buffer_len``: 0 if ``L <= start``;
    ``-penalty_factor * (L - start) / buffer_len`` for ``start < L <= max_len``;
    ``-penalty_factor`` beyond ``max_len``. ``buffer_len = 0`` is a hard cut at max_len.
    """
    if buffer_len < 0 or buffer_len > max_len:
        raise ValueError(
            f"buffer_len must be in [0, max_len]; got {buffer_len} (max_len={max_len})"
        )
    lengths = response_lengths.to(torch.float32)
    if buffer_len == 0:
        frac = (lengths > max_len).to(lengths.dtype)
    else:
        frac = torch.clamp((lengths - (max_len - buffer_len)) / buffer_len, min=0.0, max=1.0)
    return -penalty_factor * frac
