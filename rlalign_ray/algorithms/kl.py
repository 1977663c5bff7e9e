"""KL estimators and KL-coefficient controllers."""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``.

    Shapes: ``logp`` and ``ref_logp`` are ``(B, T)`` (any equal shapes); returns the same
    shape, elementwise. With ``d = logp - ref_logp`` (Schulman 2020, "Approximating KL
    divergence"):

    * ``k1 = d`` (unbiased, high variance, can be negative),
    * ``k2 = d^2 / 2`` (biased, low variance),
    * ``k3 = exp(-d) + d - 1`` (unbiased, non-negative); the exponent ``-d`` is clamped
      to ``[-20, 20]`` and the result to ``[-10, 10]`` for stability,
    * ``abs = |d|``.

    k1, k2 and abs are not clamped. Unknown ``kind`` raises ``ValueError``.
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.pow(2)
    if kind == "k3":
        neg_d = torch.clamp(-d, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(neg_d) - neg_d - 1.0, min=-10.0, max=10.0)
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {KL_KINDS}")


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op (same interface as the adaptive one)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the observed KL; the coefficient never changes."""
        del current_kl, n_steps


class AdaptiveKLController:
    """Proportional controller for the KL coefficient (Ziegler et al. 2019, sec. 2.2).

    Each update: ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value <- value * (1 + e * n_steps / horizon)``, so the coefficient grows when the
    policy drifts further than ``target`` from the reference and shrinks otherwise.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale ``value`` by ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
