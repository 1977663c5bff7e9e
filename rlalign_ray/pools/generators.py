"""Several generator pools as one: ``GeneratorPools`` hands chunks to every pool (named
generator pools beside the default one: ``pools: {gen_b: {kind: generator}}``), lands
them together, and is the weight sync's targets for all of them.

    gens = GeneratorPools([default_pool, gen_b])
    gens.submit(gens.chunks(prompts, n=8, step=3, chunk_size=4))  # spread over the pools
    for chunk in gens.poll(1.0): ...

Chunk ids and seeds are the composite's own, so a chunk samples the same whichever pool
runs it; a pinned chunk (``chunk_size=0``: one per actor over all pools) goes to its
actor's pool, the others to the pool with the least work per actor when submitted. With
one pool every call is that pool's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.pools.chunks import Chunk, make_chunks
from rlalign_ray.pools.generator import GeneratorPool
from rlalign_ray.pools.learner import Experience
from rlalign_ray.sync.targets import WeightTargets


class GeneratorPools(WeightTargets):
    def __init__(self, pools: Sequence[GeneratorPool]):
        if not pools:
            raise ValueError("GeneratorPools needs at least one generator pool")
        self.members = list(pools)
        self._next_id = 0

    def __len__(self) -> int:
        return sum(len(p) for p in self.members)

    @property
    def restarts(self) -> int:
        return sum(p.restarts for p in self.members)

    def _owner(self, index: int) -> tuple[GeneratorPool, int]:
        """The pool of actor ``index`` counted over every pool, and its index there."""
        for p in self.members:
            if index < len(p):
                return p, index
            index -= len(p)
        raise IndexError(index)

    # ---- work -------------------------------------------------------------------------
    def chunks(
        self,
        items: Sequence[PromptItem],
        n: int,
        greedy: bool = False,
        step: int = 0,
        chunk_size: int = 0,
        seed: int | None = None,
    ) -> list[Chunk]:
        """``GeneratorPool.chunks`` over every pool's actors."""
        if len(self.members) == 1:
            return self.members[0].chunks(items, n, greedy, step, chunk_size, seed)
        out = make_chunks(items, n, len(self), self._next_id, greedy, step, chunk_size, seed)
        self._next_id += len(out)
        return out

    def submit(self, chunks: Sequence[Chunk], front: bool = False) -> list[Chunk]:
        """Each chunk to its pool (pinned: its actor's; else the least busy per actor)."""
        if len(self.members) == 1:
            return self.members[0].submit(chunks, front)
        per: dict[int, list[Chunk]] = {i: [] for i in range(len(self.members))}
        added = [0] * len(self.members)
        for c in chunks:
            if c.pinned is not None:
                pool, c.pinned = self._owner(c.pinned)
                i = self.members.index(pool)
            else:
                i = min(
                    range(len(self.members)),
                    key=lambda k: self.members[k].backlog() + added[k] / len(self.members[k]),
                )
            added[i] += 1
            c.extra["pool"] = self.members[i].name
            per[i].append(c)
        for i, mine in per.items():
            if mine:
                self.members[i].submit(mine, front)
        return list(chunks)

    def poll(self, timeout_s: float = 0.0, also: Sequence[Any] = ()) -> list[Chunk]:
        """Chunks that landed in any pool, waiting up to ``timeout_s`` for the first (or for
        a ref in ``also``)."""
        if len(self.members) == 1:
            return self.members[0].poll(timeout_s, also)
        import ray

        out = [c for p in self.members for c in p.poll(0.0)]
        pending = [r for p in self.members for r in p.pending()] + list(also)
        if out or timeout_s <= 0 or not pending:
            return out
        ray.wait(pending, num_returns=1, timeout=timeout_s)
        return [c for p in self.members for c in p.poll(0.0)]

    def score_with(self, rewards: Any) -> None:
        for p in self.members:
            p.score_with(rewards)

    def scores(self, chunks: Sequence[Chunk], what: str = "reward pool") -> ScoredShard:
        return self.members[0].scores(chunks, what)

    def experience(
        self,
        chunks: Sequence[Chunk],
        rows: torch.Tensor | None,
        scores: ScoredShard,
        ref_logprobs: list[Any] | None,
        stats: dict[str, float],
    ) -> Experience:
        return self.members[0].experience(chunks, rows, scores, ref_logprobs, stats)

    def abandon(self) -> list[Chunk]:
        return [c for p in self.members for c in p.abandon()]

    def idle_seconds(self) -> float:
        return sum(p.idle_seconds() for p in self.members)

    def sleep(self, asleep: bool) -> None:
        for p in self.members:
            p.sleep(asleep)

    # ---- resumable checkpoints ------------------------------------------------------------
    def rng_states(self) -> list[Any]:
        return [s for p in self.members for s in p.rng_states()]

    def set_rng_states(self, states: Sequence[Any]) -> None:
        if len(states) != len(self):  # each pool warns
            for p in self.members:
                p.set_rng_states([])
            return
        k = 0
        for p in self.members:
            p.set_rng_states(states[k : k + len(p)])
            k += len(p)

    # ---- the weight sync's targets ----------------------------------------------------
    def receivers(self) -> list[Any]:
        return [a for p in self.members for a in p.receivers()]

    def loaders(self) -> list[tuple[str, Any]]:
        return [x for p in self.members for x in p.loaders()]

    def before_load(self, version: int) -> None:
        for p in self.members:
            p.before_load(version)

    def loaded(self, version: int) -> None:
        for p in self.members:
            p.loaded(version)

    def heal_targets(self) -> bool:
        return any([p.heal_targets() for p in self.members])

    def on_replaced(self, hook: Callable[[int], None]) -> None:
        for p in self.members:
            p.on_replaced(hook)
