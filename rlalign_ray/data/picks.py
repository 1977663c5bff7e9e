"""Which batches a step trains on when they come as dispatcher runs (``rollout.dispatch_group``).

A dispatcher run returns the list of its batches' refs as one object; the driver keeps those
lists (O(runs) refs, not one per chunk) and a ``Picks`` naming the step's batches by
``(run, position)``. Learner rank 0 opens them (``shard_objects``) where the token batches
are needed. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Picks:
    """Which batches a step trains on, when they come as dispatcher runs' lists of refs:
    ``picks[i] = (run, position)`` is the step's i-th shard. Passed as ``n_shards`` to the
    learner's ``split_batches`` (``shard_objects`` turns it back into shards)."""

    def __init__(self, picks: list[tuple[int, int]], runs: int):
        self.picks, self.runs = picks, runs

    def select(self, lists: Sequence[Sequence[Any]]) -> list[Any]:
        """The picked batch refs, in the step's order, from the runs' lists."""
        return [lists[r][p] for r, p in self.picks]


def shard_objects(n_shards: Any, objs: tuple[Any, ...]) -> tuple[int, list[Any]]:
    """``split_batches``' shards as values: with ``Picks`` the first ``runs`` objects are the
    runs' lists of batch refs, fetched here (learner rank 0), in the step's order; the rest
    (reference log-probs) follow unchanged."""
    if not isinstance(n_shards, Picks):
        return n_shards, list(objs)
    import ray

    lists, rest = objs[: n_shards.runs], list(objs[n_shards.runs :])
    batches = ray.get(n_shards.select(lists))
    return len(batches), [*batches, *rest]
