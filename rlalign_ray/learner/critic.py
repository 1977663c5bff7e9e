"""One rank of the critic (PPO's value model): a token-level value head on the policy's
architecture, trained with the clipped value loss by its own DeepSpeed group."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from rlalign_ray.algorithms import masked_mean, value_loss
from rlalign_ray.config import Config
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.learner.base import DeepSpeedRank
from rlalign_ray.models.loading import DTYPES, position_ids, resolve, without_dropout


class Critic(DeepSpeedRank):
    def __init__(self, cfg: Config, rank: int, world_size: int):
        super().__init__(cfg, rank, world_size, cfg.critic)

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        m = self.cfg.model
        path = resolve(self.cfg.critic.path or m.path)
        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=1, dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        return model if m.keep_dropout else without_dropout(model)

    def _values(self, model: Any, batch: RolloutBatch) -> torch.Tensor:
        """(B, T): V(s_t), the value of the state before each response token."""
        ids = batch.input_ids().to(self.device)
        attn = batch.attention_mask().to(self.device)
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn))
        p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        return out.logits[:, p - 1 : p + t - 1, 0].float()

    @torch.no_grad()
    def values(self, part: tuple[RolloutBatch, None]) -> torch.Tensor:
        """(n, T) values of this rank's rows (``part`` from ``split_for_ranks``)."""
        batch, _ = part
        self.engine.eval()
        values = torch.zeros_like(batch.response_mask)
        for r in self.micro_batches(batch, torch.arange(len(batch))):
            mb = batch.select(r).trimmed()
            values[r, : mb.response_ids.shape[1]] = self._values(self.engine.module, mb).cpu()
        return values * batch.response_mask

    def _update(self, batch, rows, returns, old_values, stats) -> bool:
        """One optimizer step over the mini-batch ``rows``; True when it was skipped."""
        clip, agg = self.cfg.critic.value_clip, self.objective.agg

        def micro(i, r):
            mb = batch.select(r).trimmed()
            t = mb.response_ids.shape[1]
            mask = mb.response_mask.to(self.device)
            v = self._values(self.engine, mb)
            loss, m = value_loss(
                v,
                old_values[r, :t].to(self.device),
                returns[r, :t].to(self.device),
                mask,
                clip=clip,
                agg=agg,
                norm_len=self.cfg.rollout.max_new_tokens,
            )

            def record(loss, scale):
                stats["value_loss"].append(loss.item())
                stats["vf_clipfrac"].append(float(m["vf_clipfrac"]))
                stats["values_mean"].append(masked_mean(v.detach(), mask).item())

            return loss, record

        return self.optimizer_step(batch, rows, micro)

    def train_step(
        self,
        part: tuple[RolloutBatch, None],
        returns: torch.Tensor,
        old_values: torch.Tensor,
        step: int,
    ) -> dict[str, float]:
        """One batch for this rank's rows: (n, T) returns and the values they came with."""
        batch, _ = part
        self.step = step
        stats: dict[str, list[float]] = defaultdict(list)
        stats["lr"].append(self.current_lr())  # the lr of this step's first optimizer step
        self.engine.train()
        skipped = 0
        for mini in self.mini_batches(len(batch), step):
            skipped += self._update(batch, mini, returns, old_values, stats)
        stats["skipped_steps"].append(float(skipped))
        self.release_cached_memory()
        return self.reduce_stats(stats)
