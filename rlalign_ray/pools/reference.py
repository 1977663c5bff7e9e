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
        num_actors: int = 1,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
    ):
        from rlalign_ray.topology import BUILTIN_CLASSES, resolve_class

        r = cfg.reference
        super().__init__(
            resolve_class(cls or r.actor_class or BUILTIN_CLASSES["reference"]),
            lambda i: (cfg.model, r, cfg.rollout.temperature),
            num_actors,
            resources or r.resources,
            placement or r.placement,
            name,
            cfg.run.call_timeout_s,
        )
        self.replace_as(cfg.run)

    def logprobs(self, batch_ref: Any) -> Any:
        """(B, T) reference log-probs of a rollout batch's responses, as a ref."""
        return self.next_actor().logprobs.remote(batch_ref)
