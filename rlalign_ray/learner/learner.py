"""One rank of the policy learner: the clipped policy-gradient update, weight publishing."""

from __future__ import annotations

from collections import defaultdict

import torch

from rlalign_ray.algorithms import (
    aggregate_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
)
from rlalign_ray.config import Config
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.learner.base import DeepSpeedRank
from rlalign_ray.learner.lora import adapter_params, apply_lora, merged_sources, merged_value
from rlalign_ray.models.loading import batch_logprobs, load_causal_lm, response_logprobs
from rlalign_ray.sync.weight_sync import WeightSource


class Learner(DeepSpeedRank, WeightSource):
    def __init__(self, cfg: Config, rank: int, world_size: int):
        super().__init__(cfg, rank, world_size, cfg.learner)

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = load_causal_lm(
            m.path, m.dtype, m.trust_remote_code, m.keep_dropout, m.attn_implementation
        )
        model.config.use_cache = False
        if self.lora:
            model = apply_lora(model, self.cfg.learner.lora)
            if self.role.gradient_checkpointing:  # frozen embeddings: inputs need a grad
                model.enable_input_require_grads()
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
        old = self._old_logprobs(batch, stats)
        adv = self._weighted(advantages, batch, old, stats)
        self.engine.train()
        skipped = 0
        for mini in self.mini_batches(len(batch), step):
            skipped += self._update(batch, mini, old, adv, ref, kl_coef, stats)
        stats["skipped_steps"].append(float(skipped))
        return self.reduce_stats(stats)

    def _old_logprobs(self, batch, stats) -> torch.Tensor:
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
            self.role.logprob_chunk_size,
            self.agree_chunks,
            groups=self.lockstep_micro_batches(batch, torch.arange(len(batch))),
            packed=self.packing,
        )
        stats["logprob_mismatch"].append(
            masked_mean((old - batch.logprobs).abs(), batch.response_mask).item()
        )
        return old

    @property
    def agree_chunks(self):
        """Under ZeRO-3 with several ranks: the most log-prob chunks any rank needs."""
        if self.role.zero_stage != 3 or self.world_size == 1:
            return None
        return lambda k: int(self.all_reduce(torch.tensor(k), "max"))

    def _weighted(self, adv, batch, old, stats) -> torch.Tensor:
        """Advantages times truncated importance weights min(pi_learner / pi_generator, cap)
        per token, which correct for a generator that differs numerically from the learner
        (unchanged when off)."""
        cap = self.cfg.behaviour_is_cap
        if cap <= 0 or self.cfg.algorithm.use_behaviour_logprobs:
            return adv
        w = torch.exp((old - batch.logprobs).clamp(-20, 20)).clamp(max=cap)
        stats["behaviour_is_weight"].append(masked_mean(w, batch.response_mask).item())
        return (adv[:, None] if adv.dim() == 1 else adv) * w

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
        a = self.cfg.algorithm
        norm_len = self.cfg.rollout.max_new_tokens  # Dr. GRPO: a constant, not the width
        mb = batch.select(r).trimmed()
        t = mb.response_ids.shape[1]
        mask = mb.response_mask.to(self.device)
        logp, entropy = response_logprobs(
            self.engine,
            mb,
            self.device,
            self.cfg.rollout.temperature,
            self.role.logprob_chunk_size,
            entropy="loss" if a.entropy_coef else "metric",
            agree=self.agree_chunks,
            packed=self.packing,
        )
        pg_loss, m = policy_loss(
            logp,
            old[r, :t].to(self.device),
            (adv[r] if adv.dim() == 1 else adv[r, :t]).to(self.device),
            mask,
            clip_low=a.clip_low,
            clip_high=a.clip_high,
            dual_clip=a.dual_clip,
            agg=a.loss_agg,
            norm_len=norm_len,
        )
        loss = pg_loss
        logs = {"entropy": masked_mean(entropy.detach(), mask).item()}
        logs.update({key: float(m[key]) for key in ("clipfrac", "approx_kl")})
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate_loss(entropy, mask, a.loss_agg, norm_len)
        if ref is not None:
            kl = kl_penalty(logp, ref[r, :t].to(self.device), a.kl_estimator)
            loss = loss + kl_coef * aggregate_loss(kl, mask, a.loss_agg, norm_len)
            logs["kl"] = masked_mean(kl.detach(), mask).item()
        return loss, pg_loss, logs

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
