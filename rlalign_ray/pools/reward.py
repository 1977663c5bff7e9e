"""The reward pool: scores rollout batches (by ref) where they lie, returns refs."""

from __future__ import annotations

from typing import Any

from rlalign_ray.config import Config, Placement, Resources, RewardConfig
from rlalign_ray.pools.base import ActorPool


class RewardPool(ActorPool):
    """Reward actors (``rewards/scorer.py``'s ``RewardScorer`` by default), each built
    from ``reward`` (default: ``cfg.reward``). Several pools of different classes or
    rewards can run side by side (give each a ``name``)."""

    role = "reward"

    def __init__(
        self,
        cfg: Config,
        num_actors: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
        reward: RewardConfig | None = None,
        weight: float = 1.0,
    ):
        self.reward = reward or cfg.reward
        self.weight = weight  # its total's weight in each sample's reward (Trainer)
        r = self.reward
        super().__init__(
            cfg,
            num_actors or r.num_actors,
            resources or r.resources,
            placement or r.placement,
            cls or r.actor_class,
            name,
        )

    def actor_args(self, i: int) -> tuple:
        return (self.reward,)

    def score(self, batch_ref: Any) -> Any:
        """Score one rollout batch (a ref, fetched by the actor); returns the ScoredShard's
        ref. Actors take batches in turn."""
        return self.next_actor().score.remote(batch_ref)
