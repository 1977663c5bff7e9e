"""PPO-family policy and value losses."""

from __future__ import annotations

import torch

from .utils import aggregate_loss, masked_mean


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), with optional dual clip.

    Shapes: ``logp``, ``old_logp``, ``mask`` ``(B, T)``; ``advantages`` ``(B,)`` (broadcast
    over T) or ``(B, T)``. Returns ``(loss, metrics)`` with a 0-dim ``loss``.
    Formula: ``log_ratio = clamp(logp - old_logp, -20, 20)``, ``ratio = exp(log_ratio)``,
    ``pg_loss1 = -A * ratio``, ``pg_loss2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``
    (asymmetric "clip-higher" bounds as in DAPO, Yu et al. 2025),
    ``loss_mat = max(pg_loss1, pg_loss2)``. Dual clip (Ye et al. 2020) with a constant
    ``c > 1``: where ``A < 0``, ``loss_mat = min(loss_mat, -A * c)``. The matrix is reduced
    with ``aggregate_loss(loss_mat, mask, agg, norm_len)`` (``norm_len``: Dr. GRPO's
    constant, e.g. the maximum response length; None: the padded width T).
    Metrics (python floats, masked means): ``clipfrac`` (fraction with
    ``pg_loss2 > pg_loss1``), ``approx_kl`` (k2 estimator ``0.5 * log_ratio^2`` of the
    old-to-new KL, Schulman 2020), ``ratio_mean``, and ``dual_clipfrac`` (fraction where
    the dual bound was taken) when ``dual_clip`` is set.
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be a constant > 1; got {dual_clip}")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logp)
    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(pg_loss1, pg_loss2)
    metrics: dict[str, float] = {}
    with torch.no_grad():
        metrics["clipfrac"] = masked_mean((pg_loss2 > pg_loss1).float(), mask).item()
        metrics["approx_kl"] = masked_mean(0.5 * log_ratio.pow(2), mask).item()
        metrics["ratio_mean"] = masked_mean(ratio, mask).item()
    if dual_clip is not None:
        pg_loss3 = -advantages * dual_clip
        negative = advantages < 0
        with torch.no_grad():
            hit = (negative & (loss_mat > pg_loss3)).float()
            metrics["dual_clipfrac"] = masked_mean(hit, mask).item()
        loss_mat = torch.where(negative, torch.minimum(loss_mat, pg_loss3), loss_mat)
    return aggregate_loss(loss_mat, mask, agg, norm_len), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
    agg: str = "token-mean",
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic regression loss with optional PPO-style value clipping (Schulman et al. 2017).

    Shapes: ``values``, ``old_values``, ``returns``, ``mask`` ``(B, T)``; returns
    ``(loss, metrics)``; ``agg`` and ``norm_len`` as in ``aggregate_loss``.
    Formula: without ``clip``: ``0.5 * agg((v - R)^2)``; with ``clip``:
    ``v_clipped = old_v + clamp(v - old_v, -clip, clip)`` and
    ``0.5 * agg(max((v - R)^2, (v_clipped - R)^2))``.
    Metrics: ``vf_clipfrac`` (masked fraction where the clipped term is larger; 0 without
    clip) and ``values_mean`` (masked mean of ``values``).
    """
    vf_loss1 = (values - returns).pow(2)
    if clip is None:
        loss_mat = vf_loss1
        vf_clipfrac = 0.0
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        vf_loss2 = (v_clipped - returns).pow(2)
        loss_mat = torch.maximum(vf_loss1, vf_loss2)
        with torch.no_grad():
            vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask).item()
    with torch.no_grad():
        values_mean = masked_mean(values, mask).item()
    loss = 0.5 * aggregate_loss(loss_mat, mask, agg, norm_len)
    return loss, {"vf_clipfrac": vf_clipfrac, "values_mean": values_mean}
