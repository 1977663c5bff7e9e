"""Learner classes used by the tests (imported by learner actors by module path)."""

from __future__ import annotations

from rlalign_ray.learner.learner import Learner


class NaNOnceLearner(Learner):
    """The policy learner, with a NaN loss on micro-batch 0 of step 2 (on every rank, or
    only on rank ``nan_rank``)."""

    def __init__(self, cfg, rank, world_size, nan_rank=None):
        super().__init__(cfg, rank, world_size)
        self.nan_rank = nan_rank

    def micro_loss(self, batch, r, old, adv, ref, kl_coef, index):
        loss, pg_loss, logs = super().micro_loss(batch, r, old, adv, ref, kl_coef, index)
        mine = self.nan_rank is None or self.nan_rank == self.rank
        if self.step == 2 and index == 0 and mine:
            loss = loss * float("nan")
        return loss, pg_loss, logs


class AlwaysNaNLearner(Learner):
    """Every loss is NaN: the run must end after ``learner.max_skipped_steps`` skips."""

    def micro_loss(self, batch, r, old, adv, ref, kl_coef, index):
        loss, pg_loss, logs = super().micro_loss(batch, r, old, adv, ref, kl_coef, index)
        return loss * float("nan"), pg_loss, logs


def drift(step: int) -> float:
    """The simulated drift of ``DriftingLearner``: calm, a rough stretch (steps 6-9), calm."""
    return 0.05 if 6 <= step <= 9 else 0.001


class DriftingLearner:
    """A simulated learner rank (``bench/simulated.py``) that reports an off-policy price
    growing with its batch's staleness and the drift: ``mismatch_kl = drift(step) * age``,
    ``age`` the oldest weight version's distance from the learner's (step - 1)."""

    def train_step(self, part, advantages, kl_coef, step):
        out = super().train_step(part, advantages, kl_coef, step)
        age = step - 1 - min(part["versions"])
        return {**out, "mismatch_kl": drift(step) * age, "behaviour_is_clipfrac": 0.0}
