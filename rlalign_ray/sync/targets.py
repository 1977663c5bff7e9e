"""What a weight sync sends to: ``WeightTargets``, the typed interface a generator pool
implements (``pools/generator.py``, ``pools/generators.py``), and ``ActorTargets`` for a
plain list of generator actors (a user's loop, the benchmarks).

The sync asks the targets for the actors that join its transport (``receivers``, in
order), the actors it queues each bucket's load on (``loaders``: the generators, or what
stands in front of them, e.g. a pool's dispatchers, whose loads return lists of versions),
and tells them when a version's loads are about to be queued and once they are; a pool
that replaces dead generators heals and hands the sync's ``rejoin`` hook to new ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any


class WeightTargets(ABC):
    @abstractmethod
    def receivers(self) -> list[Any]:
        """The generator actors, in order: each asks ``weight_ranks`` and joins the transport."""

    def loaders(self) -> list[tuple[str, Any]]:
        """(label, actor) of each actor a version's loads are queued on (default: every
        receiver, ``load_weights`` returning the version it holds)."""
        return [(f"generator {i}", a) for i, a in enumerate(self.receivers())]

    def before_load(self, version: int) -> None:
        """``version``'s loads are about to be queued (a pool starts what it holds)."""

    def loaded(self, version: int) -> None:
        """``version``'s loads are queued: calls queued to a generator from now on see it."""

    def heal_targets(self) -> bool:
        """Replace generators that died, if the targets may; whether any was replaced (each
        replacement calls the hooks ``on_replaced`` was given)."""
        return False

    def on_replaced(self, hook: Callable[[int], None]) -> None:
        """Call ``hook(index)`` whenever a generator is replaced."""


class ActorTargets(WeightTargets):
    """A plain list of generator actors (no healing)."""

    def __init__(self, actors: Sequence[Any]):
        self.actors = list(actors)

    def receivers(self) -> list[Any]:
        return self.actors
