"""One rank of the policy learner: the clipped policy-gradient update, weight publishing."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from rlalign_ray.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    policy_loss,
)
from rlalign_ray.config import Config
from rlalign_ray.data.batch import pad_responses
from rlalign_ray.learner.base import DeepSpeedRank
from rlalign_ray.models.loading import (
    batch_logprobs,
    load_causal_lm,
    response_logits,
    token_logprobs,
)
from rlalign_ray.sync.weight_sync import WeightSource


class Learner(DeepSpeedRank, WeightSource):
    def __init__(self, cfg: Config, rank: int, world_size: int):
        super().__init__(cfg, rank, world_size, cfg.learner)

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = load_causal_lm(m.path, m.dtype, m.trust_remote_code)
        model.config.use_cache = False
        return model

    def train_step(
        self,
        shards: list[Any],
        rows: torch.Tensor | None,
        advantages: torch.Tensor,
        ref_logprobs: list[Any] | None,
        kl_coef: float,
        step: int,
    ) -> dict[str, float]:
        """One batch: ``update_epochs`` passes of mini-batches over this rank's rows.

        shards: object refs of the step's RolloutBatch shards, in the driver's order.
        rows: the rows of the joined shards that make the batch (None: all).
        advantages: (B, T) over the batch's rows.
        ref_logprobs: object refs of reference log-probs per shard (KL as a loss term), or None.
        """
        import ray

        batch, mine = self.fetch(shards, rows, step)
        adv = advantages[mine]
        ref = None
        if ref_logprobs:
            ref = pad_responses(ray.get(ref_logprobs))
            ref = (ref[rows] if rows is not None else ref)[mine]
        stats: dict[str, list[float]] = defaultdict(list)
        old = self._old_logprobs(batch, adv, stats)
        adv = adv * self._behaviour_weights(batch, old, stats)
        self.engine.train()
        for mini in self.mini_batches(len(batch), step):
            self._update(batch, mini, old, adv, ref, kl_coef, stats)
        return self.reduce_stats(stats)

    def _old_logprobs(self, batch, adv, stats) -> torch.Tensor:
        """Log-probs of the sampling policy as the learner computes them (or the generator's)."""
        if self.cfg.algorithm.use_behaviour_logprobs:
            return batch.logprobs
        self.engine.eval()
        old = batch_logprobs(
            self.engine.module,
            batch,
            self.cfg.rollout.temperature,
            self.role.micro_batch_size,
            self.device,
        )
        stats["logprob_mismatch"].append(
            masked_mean((old - batch.logprobs).abs(), batch.response_mask).item()
        )
        return old

    def _behaviour_weights(self, batch, old, stats) -> torch.Tensor:
        """Truncated importance weights min(pi_learner / pi_generator, cap) per token, which
        correct for a generator that differs numerically from the learner (1 when off)."""
        cap = self.cfg.algorithm.behaviour_is_cap
        if cap <= 0 or self.cfg.algorithm.use_behaviour_logprobs:
            return torch.ones_like(old)
        w = torch.exp((old - batch.logprobs).clamp(-20, 20)).clamp(max=cap)
        stats["behaviour_is_weight"].append(masked_mean(w, batch.response_mask).item())
        return w

    def _update(self, batch, rows, old, adv, ref, kl_coef, stats) -> None:
        a = self.cfg.algorithm
        share = 0.0  # this rank's share of the mini-batch loss; the ranks' shares sum to it
        for r, scale in self.weighted_micro_batches(batch.response_mask, rows):
            mb = batch.select(r)
            mask = mb.response_mask.to(self.device)
            logits = response_logits(self.engine, mb, self.device)
            logp = token_logprobs(
                logits, mb.response_ids.to(self.device), self.cfg.rollout.temperature
            )
            pg_loss, m = policy_loss(
                logp,
                old[r].to(self.device),
                adv[r].to(self.device),
                mask,
                clip_low=a.clip_low,
                clip_high=a.clip_high,
                dual_clip=a.dual_clip,
                agg=a.loss_agg,
            )
            loss = pg_loss
            entropy = entropy_from_logits(logits.float())
            if a.entropy_coef:
                loss = loss - a.entropy_coef * aggregate_loss(entropy, mask, a.loss_agg)
            if ref is not None:
                kl = kl_penalty(logp, ref[r].to(self.device), a.kl_estimator)
                loss = loss + kl_coef * aggregate_loss(kl, mask, a.loss_agg)
                stats["kl"].append(masked_mean(kl.detach(), mask).item())
            self.engine.backward(loss * scale)
            self.engine.step()
            stats["pg_loss"].append(pg_loss.item())
            share += loss.item() * scale / (self.grad_accumulation * self.world_size)
            stats["entropy"].append(masked_mean(entropy.detach(), mask).item())
            for key in ("clipfrac", "approx_kl"):
                stats[key].append(float(m[key]))
        stats["loss"].append(share * self.world_size)  # reduce_stats averages over ranks
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            stats["grad_norm"].append(float(norm))

    # ---- weights out (WeightSource: weight_layout, open/join_weight_sync, publish_weights) --
    def named_weights(self):
        return self.engine.module.named_parameters()
