"""A step's token batches as the driver hands them to the learner: refs it never opens.

    StepBatches(refs)                     # the RolloutBatches' refs, in the step's order
    PickedBatches(lists, [(0, 3), ...])   # the same, as positions in lists of refs

A generator pool that returns many batches' refs as one object (a dispatcher run: the
driver then holds O(runs) refs, not one per chunk) names the step's batches by ``(list,
position)``. Either way the learner sees one thing: it sends ``args()`` with its call to
rank 0 (Ray resolves them there), and ``layout().open(values)`` there gives the
batches in the step's order. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    """How learner rank 0 opens the values of ``StepBatches.args()``: the first ``n`` of its
    call's objects are the batches; the rest (reference log-probs) follow unchanged."""

    n: int

    def open(self, objs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        return list(objs[: self.n]), list(objs[self.n :])


@dataclass(frozen=True)
class PickedLayout(Layout):
    """The first ``n`` objects are lists of batch refs; ``picks[i] = (list, position)`` is the
    step's i-th batch, fetched where it is opened."""

    picks: tuple[tuple[int, int], ...] = ()

    def select(self, lists: Sequence[Sequence[Any]]) -> list[Any]:
        """The picked batch refs, in the step's order."""
        return [lists[r][p] for r, p in self.picks]

    def open(self, objs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        import ray

        lists, rest = super().open(objs)
        return ray.get(self.select(lists)), rest


def open_batches(layout: Layout | int, objs: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(batches, rest)`` of a learner call's objects (a bare count: the first ``layout``
    are the batches)."""
    return (Layout(layout) if isinstance(layout, int) else layout).open(objs)


@dataclass(frozen=True)
class StepBatches:
    """The step's RolloutBatches as ObjectRefs, in order."""

    refs: tuple[Any, ...]

    def __init__(self, refs: Sequence[Any]):
        object.__setattr__(self, "refs", tuple(refs))

    def args(self) -> list[Any]:
        """The objects learner rank 0 receives (resolved by Ray)."""
        return list(self.refs)

    def layout(self) -> Layout:
        return Layout(len(self.refs))

    def batch_refs(self, timeout_s: float) -> list[Any]:
        """ObjectRefs of the RolloutBatches, in the step's order."""
        return list(self.refs)


@dataclass(frozen=True)
class PickedBatches(StepBatches):
    """The step's RolloutBatches as positions in lists of their refs (``lists``: refs of
    those lists; ``picks[i] = (list, position)``): only learner rank 0 opens them."""

    picks: tuple[tuple[int, int], ...] = ()

    def __init__(self, lists: Sequence[Any], picks: Sequence[tuple[int, int]]):
        super().__init__(lists)
        object.__setattr__(self, "picks", tuple(picks))

    def layout(self) -> PickedLayout:
        return PickedLayout(len(self.refs), self.picks)

    def batch_refs(self, timeout_s: float) -> list[Any]:
        import ray

        return self.layout().select(ray.get(list(self.refs), timeout=timeout_s))
