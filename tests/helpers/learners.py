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
