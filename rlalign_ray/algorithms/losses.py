"""Policy losses (the surrogate: ``POLICY_LOSSES``, picked by ``algorithm.policy_loss``)
and the critic's value loss.

A policy loss is ``fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip,
agg, norm_len) -> (loss, metrics)``: ``logp`` (B, T) with grad, ``old_logp`` (B, T) the
log-probs the samples are weighed against (no grad), ``advantages`` (B,) or (B, T), ``mask``
(B, T) float; ``agg`` and ``norm_len`` as in ``aggregate_loss``; a 0-dim ``loss`` and a
dict of python floats (logged as ``train/<name>``). Built-ins register with
``@register_policy_loss(name, ...)``; a user's function is named as ``module:function``
(it may take ``**settings`` instead of the keywords it does not use).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .registry import Registry, check_signature
from .utils import aggregate_loss, masked_mean

LOSS_SHAPE = (
    "(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip, agg, norm_len) "
    "(or **settings) and return (loss, metrics)"
)


@dataclass(frozen=True)
class PolicyLoss:
    """One policy loss and the settings it uses when the config leaves them null.

    ``clip_low`` / ``clip_high``: its clip range (``algorithm.clip_low: null``);
    ``agg``: its normaliser (``algorithm.loss_agg: null``); ``dual_clip``: whether it
    takes ``algorithm.dual_clip``."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, dict[str, float]]] = field(repr=False, compare=False)
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token-mean"
    dual_clip: bool = True
    description: str = ""


def _user_loss(key: str, obj: Any) -> PolicyLoss:
    """A user's loss: a ``PolicyLoss``, or a function (with ppo_clip's defaults)."""
    spec = obj if isinstance(obj, PolicyLoss) else None
    fn = spec.fn if spec else obj
    z = torch.zeros(1, 1)
    kwargs = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, agg="token-mean", norm_len=None)
    check_signature(key, fn, "policy loss", (z, z, z, z), kwargs, LOSS_SHAPE)
    doc = (inspect.getdoc(fn) or key).splitlines()[0]
    return spec or PolicyLoss(key, fn, description=doc)


POLICY_LOSSES = Registry("policy loss", _user_loss)


def register_policy_loss(name: str, **defaults: Any) -> Callable:
    """Decorator: add ``fn`` to ``POLICY_LOSSES`` as ``name`` (``defaults``: the other
    ``PolicyLoss`` fields); returns ``fn`` unchanged."""

    def add(fn: Callable) -> Callable:
        doc = (inspect.getdoc(fn) or name).splitlines()[0]
        POLICY_LOSSES[name] = PolicyLoss(name, fn, **{"description": doc, **defaults})
        return fn

    return add


def _expand(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, T) advantages as (B, T)."""
    if advantages.dim() == like.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.expand_as(like)


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
    advantages = _expand(advantages, logp)
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


register_policy_loss("ppo_clip", description="PPO clipped surrogate (Schulman et al. 2017).")(
    policy_loss
)


@register_policy_loss(
    "gspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean", dual_clip=False
)
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: a clipped sequence-level ratio (Zheng et al. 2025, Group Sequence Policy Opt.).

    Shapes: as ``policy_loss``. Formula: the length-normalised sequence ratio (eq. 7)
    ``s_i = exp(sum_t m_it * (logp - old_logp)_it / sum_t m_it)`` (log ratios clamped to
    [-20, 20]); per token its GSPO-token form (eq. 13) ``s_it = sg[s_i] * pi_it / sg[pi_it]``,
    equal to ``s_i`` in value, with gradient ``s_i * grad log pi_it``;
    ``loss_mat = max(-A * s_it, -A * clamp(s_it, 1 - clip_low, 1 + clip_high))``, reduced by
    ``aggregate_loss(loss_mat, mask, agg, norm_len)``. With ``agg`` seq-mean-token-mean (its
    default: the paper's 1/G sum over sequences) and ``A`` constant along a row this is the
    sequence-level objective ``-1/G sum_i min(s_i A_i, clip(s_i) A_i)`` (eq. 5) in value and
    gradient. The paper's clip range is tiny (3e-4, 4e-4): ``s_i`` is a geometric mean.
    ``dual_clip`` must be None (no dual clip in GSPO).
    Metrics: ``clipfrac`` (masked share of tokens whose clipped term was taken: rows are
    clipped whole), ``approx_kl`` (k2 of the token log ratios), ``ratio_mean`` (mean
    ``s_i`` over rows with tokens).
    """
    if dual_clip is not None:
        raise ValueError("gspo has no dual clip: set algorithm.dual_clip: null")
    advantages = _expand(advantages, logp)
    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # (B,) log s_i
    log_s = logp - logp.detach() + seq_log_ratio.detach().unsqueeze(-1)
    s = torch.exp(log_s)
    pg_loss1 = -advantages * s
    pg_loss2 = -advantages * torch.clamp(s, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(pg_loss1, pg_loss2)
    with torch.no_grad():
        rows = (mask.sum(-1) > 0).float()
        metrics = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio.pow(2), mask).item(),
            "ratio_mean": masked_mean(seq_log_ratio.exp(), rows).item(),
        }
    return aggregate_loss(loss_mat, mask, agg, norm_len), metrics


@register_policy_loss("cispo", clip_low=1.0, clip_high=0.28, dual_clip=False)
def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: REINFORCE with a clipped importance weight (MiniMax-M1, 2025, eq. 4).

    Shapes: as ``policy_loss``. Formula: ``r = exp(clamp(logp - old_logp, -20, 20))``,
    ``w = sg[clamp(r, 1 - clip_low, 1 + clip_high)]``, ``loss_mat = -w * A * logp``, reduced
    by ``aggregate_loss(loss_mat, mask, agg, norm_len)`` (token-mean: the paper's
    ``1 / sum_i |o_i|``). Unlike PPO no token loses its gradient: the weight is clipped,
    not the update (each token's gradient is ``-w * A * grad log pi / N``). The paper sets
    no lower bound on the weight (``clip_low`` 1.0: w >= 0) and tunes ``clip_high``.
    ``dual_clip`` must be None.
    Metrics: ``clipfrac`` (masked share of tokens whose weight was clipped), ``approx_kl``
    (k2 of the log ratios), ``ratio_mean`` (masked mean of ``r``).
    """
    if dual_clip is not None:
        raise ValueError("cispo has no dual clip: set algorithm.dual_clip: null")
    advantages = _expand(advantages, logp)
    log_ratio = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio).detach()
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = -weight * advantages * logp
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((weight != ratio).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio.pow(2), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
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
