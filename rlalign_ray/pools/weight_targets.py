"""A generator pool as a weight sync's targets (``sync.targets.WeightTargets``): its
generators join the transport; the loads go to them, or with dispatchers
(``rollout.dispatch_group``) to the dispatchers, one call per group queued after the
chunks sent to it, so the sync never sees how the pool schedules its chunks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlalign_ray.sync.targets import WeightTargets


class PoolTargets(WeightTargets):
    """Mixed into ``GeneratorPool`` (an ``ActorPool``: ``actors``, ``heal``, ``max_restarts``,
    ``on_replace``; and its own ``dispatchers``, ``versions`` and ``before_load``)."""

    actors: list[Any]
    dispatchers: list[Any]
    versions: list[int]
    max_restarts: int
    on_replace: list[Callable[[int], None]]
    name: str

    def receivers(self) -> list[Any]:
        return list(self.actors)

    def loaders(self) -> list[tuple[str, Any]]:
        if self.dispatchers:
            return [(f"dispatcher of {self.name}s {i}", d) for i, d in enumerate(self.dispatchers)]
        return [(f"{self.name} {i}", a) for i, a in enumerate(self.actors)]

    def loaded(self, version: int) -> None:
        self.versions = [version] * len(self.actors)

    def heal_targets(self) -> bool:
        return bool(self.max_restarts) and bool(self.heal())  # type: ignore[attr-defined]

    def on_replaced(self, hook: Callable[[int], None]) -> None:
        if hook not in self.on_replace:
            self.on_replace.append(hook)
