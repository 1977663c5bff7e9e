"""The named reward pools (``pools: {judge: {kind: reward, weight: 0.1, ...}}``) beside the
default one: each scores every chunk that lands, and a sample's reward is the default
pool's total plus each named pool's total times its weight. A named pool's own rewards are
logged as ``<pool>/<reward>`` (``train/reward/judge/<reward>``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from rlalign_ray.data.batch import NONFINITE, ScoredShard
from rlalign_ray.pools import Chunk, RewardPool


def combine(main: ScoredShard, judged: dict[str, tuple[float, ScoredShard]]) -> ScoredShard:
    """``main`` with each named pool's total times its weight added to the scores and its
    breakdown under ``<pool>/<reward>`` (non-finite flags merged)."""
    scores, breakdown = main.scores, dict(main.breakdown)
    for name, (weight, shard) in judged.items():
        scores = scores + weight * shard.scores
        for key, values in shard.breakdown.items():
            if key == NONFINITE:
                old = breakdown.get(NONFINITE)
                breakdown[key] = values if old is None else torch.maximum(old, values)
            else:
                breakdown[f"{name}/{key}"] = values
    return replace(main, scores=scores, breakdown=breakdown)


class Judges:
    """The named reward pools of a run (none: every call is a no-op)."""

    def __init__(self, pools: Sequence[RewardPool]):
        self.pools = list(pools)

    def __bool__(self) -> bool:
        return bool(self.pools)

    def score(self, ref: Any) -> dict[str, Any]:
        """Every named pool's ScoredShard ref of one rollout batch (a ref), by pool name."""
        return {p.name: p.score(ref) for p in self.pools}

    def combined(
        self,
        chunks: Sequence[Chunk],
        shards: list[ScoredShard],
        judged: dict[int, dict[str, Any]],
        fetch: Callable[[list[Chunk], dict[int, Any], str, RewardPool], list[ScoredShard]],
        what: str,
    ) -> list[ScoredShard]:
        """Each chunk's ``shards`` entry combined with its named pools' scores (``judged``:
        chunk id -> pool name -> ref; a chunk without an entry was combined already, e.g.
        restored from a checkpoint's buffer). ``fetch`` gets a pool's refs, scoring a
        chunk again if the actor that had it died; the new refs go back into ``judged``."""
        mine = [c for c in chunks if c.id in judged]
        per: dict[str, dict[int, ScoredShard]] = {}
        for pool in self.pools if mine else []:
            refs = {c.id: judged[c.id][pool.name] for c in mine}
            got = fetch(mine, refs, f"{what} {pool.name}", pool)
            per[pool.name] = dict(zip([c.id for c in mine], got))
            for c in mine:
                judged[c.id][pool.name] = refs[c.id]
        out = []
        for c, shard in zip(chunks, shards):
            if c.id in judged:
                shard = combine(shard, {p.name: (p.weight, per[p.name][c.id]) for p in self.pools})
            out.append(shard)
        return out
