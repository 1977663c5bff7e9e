"""The off-policy price (``algorithms/staleness.py``) and ``trainer.max_staleness: auto``'s
controller, driven by a simulated drift; the rollout buffer's files round-trip exactly."""

from __future__ import annotations

import math

import pytest
import torch

from rlalign_ray.algorithms import StalenessController
from rlalign_ray.algorithms.objective import mismatch_metrics
from rlalign_ray.config import load_config
from rlalign_ray.data.batch import RolloutBatch, ScoredShard
from rlalign_ray.errors import ConfigError
from rlalign_ray.trainers.buffer import BufferedChunk, BufferedStep, RolloutBuffer
from rlalign_ray.trainers.rollouts import staleness_controller

REWARD = "reward.rewards=[{type: function, path: 'rlalign_ray.rewards.builtin:arithmetic_exact'}]"


def test_the_price_by_hand():
    # token log-ratios (learner - behaviour): log 3, 0, log 0.5 and a masked-out one
    behaviour = torch.zeros(1, 4)
    learner = torch.tensor([[math.log(3.0), 0.0, math.log(0.5), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    price = mismatch_metrics(learner, behaviour, mask, cap=2.0)
    # r = 3 > cap on 1 of 3 tokens; k3 = (r - 1) - log r: (2 - log 3) + 0 + (-0.5 + log 2)
    assert price["behaviour_is_clipfrac"] == pytest.approx(1 / 3)
    k3 = (2 - math.log(3)) + (-0.5 + math.log(2))
    assert price["mismatch_kl"] == pytest.approx(k3 / 3, rel=1e-6)
    assert mismatch_metrics(learner, behaviour, mask, cap=0.0)["behaviour_is_clipfrac"] == 0
    same = mismatch_metrics(behaviour, behaviour, mask, cap=2.0)
    assert same["behaviour_is_clipfrac"] == 0.0 and same["mismatch_kl"] == 0.0


def test_the_bound_falls_with_a_rising_drift_and_rises_when_it_passes():
    c = StalenessController(cap=3, kl_high=0.01, clip_high=0.02, patience=2)
    assert c.bound == 1
    # calm (under a quarter of both thresholds), rough, in between, calm again
    drift = [0.001] * 4 + [0.02, 0.03] + [0.005] * 3 + [0.001] * 6
    bounds = [c.update(kl, 0.0) for kl in drift]
    assert bounds == [1, 2, 2, 3, 2, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3]
    # the clip fraction alone lowers it too; never below 0 or above the cap
    assert [c.update(0.0, 0.5) for _ in range(5)] == [2, 1, 0, 0, 0]
    assert max(c.update(0.0, 0.0) for _ in range(20)) == 3
    # a checkpoint's state continues exactly
    c.update(0.0, 0.0)
    d = StalenessController(cap=3, kl_high=0.01, clip_high=0.02, patience=2)
    d.load_state_dict(c.state_dict())
    assert [d.update(x, 0.0) for x in drift] == [c.update(x, 0.0) for x in drift]


def test_a_fixed_bound_never_moves_and_auto_is_validated():
    fixed = StalenessController.fixed(2)
    assert [fixed.update(1.0, 1.0), fixed.update(0.0, 0.0)] == [2, 2]
    cfg = load_config(None, [REWARD, "trainer.max_staleness=auto", "trainer.max_staleness_cap=5"])
    assert cfg.pipelined and cfg.staleness_cap == 5 and cfg.behaviour_is_cap == 2.0
    auto = staleness_controller(cfg)
    assert (auto.cap, auto.bound, auto.adaptive) == (5, 1, True)
    assert staleness_controller(load_config(None, [REWARD])).bound == 0
    with pytest.raises(ConfigError) as e:
        load_config(None, [REWARD, "trainer.max_staleness=fast", "trainer.max_staleness_cap=0"])
    assert "trainer.max_staleness: an integer >= 0 or auto, got 'fast'" in str(e.value)
    assert "trainer.max_staleness_cap: must be >= 1" in str(e.value)


def test_the_rollout_buffer_round_trips_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=torch.randint(0, 50, (4, 3), generator=g),
        prompt_mask=torch.ones(4, 3, dtype=torch.long),
        response_ids=torch.randint(0, 50, (4, 5), generator=g),
        response_len=torch.tensor([5, 2, 3, 1]),
        response_mask=torch.ones(4, 5),
        logprobs=torch.randn(4, 5, generator=g),
        version=3,
        group_ids=torch.tensor([7, 7, 9, 9]),
        prompts=["1+2=", "1+2=", "3+4=", "3+4="],
        completions=["3", "4", "7 ", "x"],
        columns={"answer": [3, 3, 7, 7], "meta": [{"a": [1, 2]}] * 4},
        truncated=torch.tensor([True, False, False, False]),
        raw_prompts=[[{"role": "user", "content": "1+2="}]] * 2 + ["3+4="] * 2,
        token_versions=torch.tensor([[3, 3, 4, 4, 4]] * 4),  # in-flight updates: a load
    )
    scores = ScoredShard(
        torch.tensor([0.5, float("nan"), 1.0, 0.0]),
        {"exact": torch.tensor([1.0, 0.0, 1.0, 0.0])},
        batch.group_ids,
        batch.response_len,
        batch.response_mask,
        batch.logprobs,
    )
    ref = torch.randn(4, 5, generator=g)
    chunk = BufferedChunk([7, 9], 2, 12345, 3, 1, None, batch, scores, ref, inflight_loads=1)
    step = BufferedStep(5, 2, 4, {"epoch": 0, "pos": 8}, [chunk])
    RolloutBuffer(6, {"epoch": 1, "pos": 3}, [step]).write(tmp_path / "rollout_buffer")
    back = RolloutBuffer.read(tmp_path / "rollout_buffer")
    assert (back.requested, back.sampler) == (6, {"epoch": 1, "pos": 3})
    (s,) = back.steps
    assert (s.step, s.rounds, s.dropped_stale, s.sampler_before) == (
        5,
        2,
        4,
        {"epoch": 0, "pos": 8},
    )
    (c,) = s.chunks
    assert (c.prompts, c.n, c.seed, c.version, c.actor, c.pinned) == ([7, 9], 2, 12345, 3, 1, None)
    assert c.inflight_loads == 1
    for name, value in vars(batch).items():
        got = getattr(c.batch, name)
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, name
    assert torch.equal(c.scores.scores.nan_to_num(-1.0), scores.scores.nan_to_num(-1.0))
    assert torch.equal(c.scores.breakdown["exact"], scores.breakdown["exact"])
    assert torch.equal(c.ref_logprobs, ref)
    assert RolloutBuffer.read(tmp_path / "elsewhere") is None
