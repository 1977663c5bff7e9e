"""The reference pool: frozen log-probs for the KL term, per rollout batch ref."""

from __future__ import annotations

from typing import Any

from rlalign_ray.config import Config, Placement, Resources
from rlalign_ray.pools.base import ActorPool


class ReferencePool(ActorPool):
    role = "reference"

    def __init__(
        self,
        cfg: Config,
        num_actors: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
    ):
        super().__init__(cfg, num_actors, resources, placement, cls, name)

    def actor_args(self, i: int) -> tuple:
        return (self.cfg.model, self.cfg.reference, self.cfg.rollout.temperature)

    def logprobs(self, batch_ref: Any) -> Any:
        """(B, T) reference log-probs of a rollout batch's responses, as a ref."""
        return self.next_actor().logprobs.remote(batch_ref)
