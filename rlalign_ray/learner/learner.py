"""One rank of the policy learner: the policy-gradient update (the objective's loss,
``algorithms/objective.py``), weight publishing."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from rlalign_ray.algorithms.objective import (
    behaviour_correction,
    mismatch_metrics,
    policy_objective,
)
from rlalign_ray.config import Config
from rlalign_ray.data.batch import RolloutBatch, packed
from rlalign_ray.learner.base import DeepSpeedRank
from rlalign_ray.learner.lora import adapter_params, apply_lora, merged_sources, merged_value
from rlalign_ray.models.loading import (
    attach_logprob_head,
    batch_logprobs,
    load_causal_lm,
    response_logprobs,
)
from rlalign_ray.sync.weight_sync import WeightSource


class Learner(DeepSpeedRank, WeightSource):
    def __init__(self, cfg: Config, rank: int, world_size: int):
        super().__init__(cfg, rank, world_size, cfg.learner)
        # (step, old log-probs, their statistics) computed ahead by ``old_logprobs``
        self._held: tuple[int, torch.Tensor, dict[str, list[float]]] | None = None

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = load_causal_lm(m.path, m.dtype, m.trust_remote_code, dropout=m.keep_dropout)
        model.config.use_cache = False
        if self.lora:
            model = apply_lora(model, self.cfg.learner.lora)
            if self.role.gradient_checkpointing:  # frozen embeddings: inputs need a grad
                model.enable_input_require_grads()
        if self.role.zero_stage == 3:  # the head over response tokens in one module call
            attach_logprob_head(model)
        return model

    @property
    def lora(self) -> bool:
        return self.cfg.learner.lora.rank > 0

    def train_step(
        self,
        part: tuple[RolloutBatch, torch.Tensor | None],
        advantages: torch.Tensor,
        kl_coef: float,
        step: int,
    ) -> dict[str, float]:
        """One batch: ``update_epochs`` passes of mini-batches over this rank's rows.

        part: this rank's rows and their (n, T) reference log-probs (None: no KL loss term),
            from ``split_for_ranks``.
        advantages: (n,) one per row (outcome estimators) or (n, T), for this rank's rows.
        """
        batch, ref = part
        self.step = step
        stats: dict[str, list[float]] = defaultdict(list)
        stats["lr"].append(self.current_lr())  # the lr of this step's first optimizer step
        held, self._held = self._held, None
        if held is not None and held[0] == step:  # computed ahead for the in-reward KL
            old = held[1]
            for key, values in held[2].items():
                stats[key] += values
        else:
            old = self._old_logprobs(batch, stats)
        adv, batch = self._corrected(advantages, batch, old, stats)
        self.engine.train()
        skipped = 0
        for mini in self.mini_batches(len(batch), step):
            skipped += self._update(batch, mini, old, adv, ref, kl_coef, stats)
        stats["skipped_steps"].append(float(skipped))
        self.release_cached_memory()
        return self.reduce_stats(stats)

    def old_logprobs(self, part: tuple[RolloutBatch, None], step: int) -> torch.Tensor:
        """(n, T) old log-probs of this rank's rows (the policy before step ``step``'s
        update), for the driver's in-reward KL; kept for ``train_step`` of the same step,
        which then does not compute them again."""
        stats: dict[str, list[float]] = defaultdict(list)
        old = self._old_logprobs(part[0], stats)
        self._held = (step, old, stats)
        return packed(old)

    def _old_logprobs(self, batch, stats) -> torch.Tensor:
        """Log-probs of the sampling policy as the learner computes them (or the generator's),
        with the rollout/learner mismatch statistics."""
        if self.cfg.algorithm.use_behaviour_logprobs:
            return batch.logprobs
        self.engine.eval()
        old = batch_logprobs(
            self.engine.module,
            batch,
            self.cfg.rollout.temperature,
            self.role.micro_batch_size,
            self.device,
            self.role.logprob_chunk_size,
            self.agree_chunks,
        )
        # logprob_mismatch, mismatch_kl, behaviour_is_clipfrac: the off-policy price that
        # trainer.max_staleness: auto steers by
        mask, cap = batch.response_mask, self.cfg.behaviour_is_cap
        for key, value in mismatch_metrics(old, batch.logprobs, mask, cap).items():
            stats[key].append(value)
        return old

    @property
    def agree_chunks(self):
        """Under ZeRO-3 with several ranks: the most log-prob chunks any rank needs."""
        if self.role.zero_stage != 3 or self.world_size == 1:
            return None
        return lambda k: int(self.all_reduce(torch.tensor(k), "max"))

    def _corrected(self, adv, batch, old, stats) -> tuple[torch.Tensor, RolloutBatch]:
        """Advantages times the truncated importance weights min(pi_learner / pi_generator,
        cap) per token, and the rows whose sequence ratio leaves behaviour_seq_mask taken out
        of the loss (``objective.behaviour_correction``); unchanged when off."""
        if self.cfg.algorithm.use_behaviour_logprobs:
            return adv, batch
        mask = batch.response_mask
        adv, keep, metrics = behaviour_correction(self.objective, adv, old, batch.logprobs, mask)
        for key, value in metrics.items():
            stats[key].append(value)
        if keep is not None:
            batch = dataclasses.replace(batch, response_mask=mask * keep[:, None].to(mask.dtype))
        return adv, batch

    def _update(self, batch, rows, old, adv, ref, kl_coef, stats) -> bool:
        """One optimizer step over the mini-batch ``rows``; True when it was skipped."""
        share = []  # this rank's share of the mini-batch loss; the ranks' shares sum to it

        def micro(i, r):
            loss, pg_loss, logs = self.micro_loss(batch, r, old, adv, ref, kl_coef, i)

            def record(loss, scale):
                stats["pg_loss"].append(pg_loss.item())
                share.append(loss.item() * scale / (self.grad_accumulation * self.world_size))
                for key, value in logs.items():
                    stats[key].append(value)

            return loss, record

        skipped = self.optimizer_step(batch, rows, micro)
        if not skipped:
            stats["loss"].append(sum(share) * self.world_size)  # reduce_stats: mean of ranks
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                stats["grad_norm"].append(float(norm))
        return skipped

    def micro_loss(self, batch, r, old, adv, ref, kl_coef, index):
        """The loss of micro-batch ``index`` (rows ``r``): (loss, policy-gradient loss, a
        dict of its statistics). Subclasses may wrap it (tests inject a NaN here)."""
        o = self.objective
        mb = batch.select(r).trimmed()
        t = mb.response_ids.shape[1]
        mask = mb.response_mask.to(self.device)
        logp, entropy = response_logprobs(
            self.engine,
            mb,
            self.device,
            self.cfg.rollout.temperature,
            self.role.logprob_chunk_size,
            entropy="loss" if o.entropy_coef else "metric",
            agree=self.agree_chunks,
        )
        return policy_objective(
            o,
            logp,
            old[r, :t].to(self.device),
            (adv[r] if adv.dim() == 1 else adv[r, :t]).to(self.device),
            mask,
            entropy,
            None if ref is None else ref[r, :t].to(self.device),
            kl_coef,
        )

    # ---- weights out (WeightSource: weight_layout, open/join_weight_sync, publish_weights) --
    def named_weights(self):
        """The parameters generators hold, by the base model's names (LoRA: the base
        weights, whose merged values travel: ``weight_values``)."""
        if not self.lora:
            return self.engine.module.named_parameters()
        self._lora_layers = {id(p): layer for _, p, layer in merged_sources(self.engine.module)}
        return [(n, p) for n, p, _ in merged_sources(self.engine.module)]

    def weight_extras(self, params):
        if not self.lora:
            return []
        return [a for p in params for a in adapter_params(self._lora_layers.get(id(p)))]

    def weight_values(self, params):
        if not self.lora:
            return params
        return [merged_value(p, self._lora_layers.get(id(p))) for p in params]

    def get_weights(self):
        """Every weight generators hold (LoRA: merged), as numpy arrays (for tests)."""
        if not self.lora:
            return super().get_weights()
        with self.gathered():
            pairs = self.named_weights()
            values = self.weight_values([p for _, p in pairs])
            return {n: v.cpu().float().numpy().copy() for (n, _), v in zip(pairs, values)}
