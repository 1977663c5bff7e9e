"""The reward scorer: every configured reward on a rollout shard, summed with weights.

A plain class; ``rlalign_ray.runtime.actors`` wraps it as a reward actor.
"""

from __future__ import annotations

import torch

from rlalign_ray.config import RewardConfig
from rlalign_ray.data.batch import RolloutBatch, ScoredShard
from rlalign_ray.models.loading import default_device, set_threads
from rlalign_ray.rewards.sources import load_reward


class RewardScorer:
    def __init__(self, cfg: RewardConfig):
        set_threads(cfg.resources.num_cpus)
        device = default_device()
        self.sources = [(load_reward(spec, device), spec.weight) for spec in cfg.rewards]
        names = [src.name for src, _ in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(
                f"reward names must be unique, got {names}; set reward.rewards[i].name"
            )

    def score(self, batch: RolloutBatch) -> ScoredShard:
        breakdown: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch))
        for source, weight in self.sources:
            values = torch.tensor(source(batch.prompts, batch.completions, batch.columns))
            breakdown[source.name] = values
            total += weight * values
        return ScoredShard(
            scores=total,
            breakdown=breakdown,
            group_ids=batch.group_ids,
            response_len=batch.response_len,
            response_mask=batch.response_mask,
            logprobs=batch.logprobs,
        )

    def ping(self) -> int:
        return len(self.sources)
