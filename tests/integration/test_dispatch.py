"""Dispatchers (``rollout.dispatch_group``) and joined scores: what the driver gets is what it
would get calling every actor itself. (A full run with dispatchers reproducing the recorded
metrics is in test_pipeline.py.)"""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.data.batch import ScoredShard
from rlalign_ray.runtime import dispatch

pytestmark = pytest.mark.integration


class LightPool:  # what gather_scores reads of a RewardPool
    def __init__(self, actors):
        self.actors, self._turn = actors, -1

    def next_actor(self):
        self._turn += 1
        return self.actors[self._turn % len(self.actors)]


def _shard(i: int) -> ScoredShard:
    t = 1 + i % 3  # ragged response widths: joining pads them
    mask = torch.ones(2, t)
    s = torch.tensor([float(i), -float(i)])
    return ScoredShard(s, {"r": s * 2}, torch.tensor([i, i]), torch.tensor([t, t]), mask, mask)


def test_reward_actors_join_scores_in_order(ray_local):
    import ray

    shards = [_shard(i) for i in range(dispatch.GATHER * 2 + 5)]
    refs = [ray.put(s) for s in shards]
    # any actor will do (the package's own class: Ray workers cannot import test modules)
    actors = [ray.remote(dispatch.Dispatcher).remote([], 0, "g", 1.0) for _ in range(2)]
    joined = dispatch.gather_scores(refs, LightPool(actors), "reward pool", 60.0)
    want = ScoredShard.concat(shards)
    for name in ("scores", "group_ids", "response_len", "response_mask", "logprobs"):
        assert torch.equal(getattr(joined, name), getattr(want, name)), name
    assert torch.equal(joined.breakdown["r"], want.breakdown["r"])
    for a in actors:
        ray.kill(a)
