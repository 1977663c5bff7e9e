"""The reward scorer's limits: ``reward.timeout_s`` on a hung reward, and
``reward.on_nonfinite`` (error, zero, drop_group) on NaN rewards."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from rlalign_ray.config import RewardConfig, RewardSpec, config_from_dict
from rlalign_ray.data.batch import NONFINITE
from rlalign_ray.errors import ConfigError, RewardError
from rlalign_ray.rewards.scorer import RewardScorer
from rlalign_ray.trainers.step_rows import group_finite


class Batch(SimpleNamespace):
    def __len__(self) -> int:
        return len(self.completions)


def _batch(n: int = 4) -> Batch:
    return Batch(
        prompts=[f"p{i}" for i in range(n)],
        completions=[f"{i}x" for i in range(n)],
        columns={},
        group_ids=torch.arange(n) // 2,
        response_len=torch.ones(n, dtype=torch.long),
        response_mask=torch.ones(n, 1),
        logprobs=torch.zeros(n, 1),
        prompt_mask=torch.ones(n, 1),
    )


def _scorer(path: str, **kw) -> RewardScorer:
    spec = RewardSpec(type="function", path=f"helpers.rewards:{path}")
    return RewardScorer(RewardConfig(rewards=[spec], **kw))


def test_nan_reward_error_names_the_reward_and_the_sample():
    with pytest.raises(RewardError) as err:
        _scorer("nan_on_first").score(_batch())
    msg = str(err.value)
    assert "helpers.rewards:nan_on_first'" in msg and "sample 0" in msg and "'p0'" in msg
    assert "reward.on_nonfinite" in msg


def test_nan_reward_zero_counts_it():
    out = _scorer("nan_on_first", on_nonfinite="zero").score(_batch())
    assert out.scores[0] == 0.0 and torch.isfinite(out.scores).all()
    assert out.breakdown[NONFINITE].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_nan_reward_drop_group_marks_the_row():
    out = _scorer("nan_on_first", on_nonfinite="drop_group").score(_batch())
    assert math.isnan(out.scores[0]) and torch.isfinite(out.scores[1:]).all()
    assert group_finite(out.scores, 2).tolist() == [False, True]


def test_hung_reward_fails_within_its_timeout():
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        _scorer("hangs", timeout_s=1.0).score(_batch())
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "'hangs'" in msg and "1s (reward.timeout_s)" in msg and "'p0'" in msg


def test_reward_errors_pass_through_the_timeout_thread():
    with pytest.raises(RewardError, match="ValueError: bad reward input"):
        _scorer("raises", timeout_s=5.0).score(_batch())


def test_config_names_bad_limits():
    raw = {
        "reward": {
            "rewards": [{"type": "function", "path": "helpers.rewards:digit_fraction"}],
            "on_nonfinite": "skip",
            "timeout_s": -1,
        },
        "rollout": {"timeout_s": 0},
        "learner": {"max_skipped_steps": -1},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    msg = str(err.value)
    assert "reward.on_nonfinite: use one of error, zero, drop_group; got 'skip'" in msg
    assert "reward.timeout_s: must be >= 0" in msg and "rollout.timeout_s: must be > 0" in msg
    assert "learner.max_skipped_steps: must be >= 0" in msg
