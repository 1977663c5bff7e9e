"""The price of off-policy samples, and a staleness bound that steers itself by it.

Pipelined training (``trainer.max_staleness``) trains on samples drawn by an older policy
(the behaviour policy b) than the one it updates (the learner's proximal policy pi, as it
computes the log-probs before the update). Two numbers say what that costs, per step:

- the importance-weight clip fraction: the share of response tokens whose weight
  ``r = pi / b`` exceeds the cap of the truncated weight ``min(r, cap)`` (AReaL's decoupled
  objective; ``algorithm.behaviour_is_cap``) -- tokens whose correction is cut short;
- the mismatch KL, KL(b || pi) over response tokens, estimated from the sampled tokens with
  Schulman's k3 estimator ``E_b[(r - 1) - log r]`` (unbiased, never negative).

``StalenessController`` (``trainer.max_staleness: auto``) lowers the bound by one as soon
as either number passes its threshold, and raises it by one (up to
``trainer.max_staleness_cap``) after ``patience`` steps in a row on which both stay under a
quarter of their thresholds (``LOW_FRACTION``): a price in between keeps the bound, the
gap between the two levels is the hysteresis that stops it from flapping.
The price itself is measured on each learner rank: ``objective.mismatch_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass

LOW_FRACTION = 0.25  # the bound rises only while the price stays under this share of its threshold


@dataclass
class StalenessController:
    """The staleness bound of ``trainer.max_staleness: auto``, steered by the off-policy price.

    ``bound`` starts at ``min(1, cap)``; ``update(kl, clipfrac)`` after each step:
    ``kl > kl_high`` or ``clipfrac > clip_high``: ``bound <- max(bound - 1, 0)`` at once;
    ``kl < LOW_FRACTION * kl_high`` and ``clipfrac < LOW_FRACTION * clip_high`` on
    ``patience`` steps in a row: ``bound <- min(bound + 1, cap)``; otherwise it stays.
    A fixed bound (``trainer.max_staleness: k``) is ``StalenessController.fixed(k)``.
    """

    cap: int
    kl_high: float = 0.01
    clip_high: float = 0.02
    patience: int = 3
    adaptive: bool = True
    bound: int = -1  # -1: min(1, cap), set on construction
    calm: int = 0  # steps in a row with a small price

    def __post_init__(self) -> None:
        if self.bound < 0:
            self.bound = min(1, self.cap)

    @classmethod
    def fixed(cls, k: int) -> StalenessController:
        return cls(cap=k, bound=k, adaptive=False)

    def update(self, mismatch_kl: float, clipfrac: float) -> int:
        """Take one step's price; returns the bound for the next step."""
        if not self.adaptive:
            return self.bound
        if mismatch_kl > self.kl_high or clipfrac > self.clip_high:
            self.bound, self.calm = max(self.bound - 1, 0), 0
        elif mismatch_kl < LOW_FRACTION * self.kl_high and clipfrac < LOW_FRACTION * self.clip_high:
            self.calm += 1
            if self.calm >= self.patience:
                self.bound, self.calm = min(self.bound + 1, self.cap), 0
        else:
            self.calm = 0
        return self.bound

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to continue exactly (the thresholds come from the config)."""
        return {"bound": self.bound, "calm": self.calm}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bound, self.calm = int(state["bound"]), int(state["calm"])
