"""Registry of advantage estimators keyed by the config's algorithm name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .advantages import (
    compute_token_rewards,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

# (scores, group_ids, mask, gamma, kl, kl_coef) -> (B, T) advantages
OutcomeFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AdvantageEstimator:
    """Static description of one algorithm's advantage estimator.

    ``needs_critic``: a value model is trained and GAE is used.
    ``needs_groups``: several samples per prompt (n_samples > 1) are required.
    ``compute``: critic-free outcome estimator, or None when values are needed.
    ``per_sequence``: its advantages are constant along each response (one per row).
    """

    name: str
    needs_critic: bool
    needs_groups: bool
    description: str
    compute: OutcomeFn | None = field(default=None, repr=False, compare=False)
    per_sequence: bool = False


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_seq[:, None] * mask.to(per_seq.dtype)


def _grpo(scores, group_ids, mask, gamma, kl, kl_coef):
    return _broadcast(group_advantages(scores, group_ids, scale_by_std=True), mask)


def _dr_grpo(scores, group_ids, mask, gamma, kl, kl_coef):
    return _broadcast(group_advantages(scores, group_ids, scale_by_std=False), mask)


def _rloo(scores, group_ids, mask, gamma, kl, kl_coef):
    return _broadcast(rloo_advantages(scores, group_ids), mask)


def _reinforce_pp(scores, group_ids, mask, gamma, kl, kl_coef):
    rewards = compute_token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
    return reinforce_pp_advantages(rewards, mask, gamma)


def _reinforce_pp_baseline(scores, group_ids, mask, gamma, kl, kl_coef):
    return reinforce_pp_baseline_advantages(scores, group_ids, mask)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    est.name: est
    for est in (
        AdvantageEstimator(
            "ppo", True, False, "PPO with a learned critic and GAE (Schulman et al. 2016/2017)."
        ),
        AdvantageEstimator(
            "grpo",
            False,
            True,
            "Group mean/std normalised outcome (Shao et al. 2024).",
            _grpo,
            True,
        ),
        AdvantageEstimator(
            "dr_grpo",
            False,
            True,
            "Group mean-centred outcome, no std (Liu et al. 2025).",
            _dr_grpo,
            True,
        ),
        AdvantageEstimator(
            "rloo", False, True, "Leave-one-out group baseline (Ahmadian et al. 2024).", _rloo, True
        ),
        AdvantageEstimator(
            "reinforce_pp",
            False,
            False,
            "Discounted token returns with KL-in-reward, batch-whitened (Hu 2025).",
            _reinforce_pp,
        ),
        AdvantageEstimator(
            "reinforce_pp_baseline",
            False,
            True,
            "Group-mean baseline then batch whitening (Hu 2025).",
            _reinforce_pp_baseline,
            True,
        ),
    )
}


def check_algorithm_name(name: str) -> AdvantageEstimator:
    """Return the registry entry for ``name``; unknown names raise ``ValueError``."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        valid = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown algorithm {name!r}; valid names: {valid}") from None


def outcome_advantages(
    name: str,
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float = 1.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Token advantages ``(B, T)`` for a critic-free estimator, dispatched via the registry.

    Shapes: ``scores`` ``(B,)``, ``group_ids`` ``(B,)`` (may be None for ``reinforce_pp``),
    ``mask`` ``(B, T)``, ``kl`` ``(B, T)`` or None.
    grpo / dr_grpo / rloo: the per-sequence advantage broadcast over T, times mask.
    reinforce_pp: ``reinforce_pp_advantages(compute_token_rewards(scores, mask, kl,
    kl_coef), mask, gamma)``. reinforce_pp_baseline: group-mean baseline then batch
    whitening. ``gamma``, ``kl`` and ``kl_coef`` are only used by reinforce_pp.
    ``ppo`` raises ``ValueError``: GAE needs values, call ``gae`` instead.
    """
    est = check_algorithm_name(name)
    if est.compute is None:
        raise ValueError(
            f"algorithm {name!r} uses a critic: GAE needs per-token values, "
            "call gae(token_rewards, values, mask, gamma, lam) instead"
        )
    if est.needs_groups and group_ids is None:
        raise ValueError(f"algorithm {name!r} needs group_ids (n_samples > 1 per prompt)")
    return est.compute(scores, group_ids, mask, gamma, kl, kl_coef)
