"""Non-finite values and time limits: a NaN loss skips one optimizer step, NaN rewards
follow ``reward.on_nonfinite``, a hung reward fails within ``reward.timeout_s``."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import small_config
from helpers.learners import NaNOnceLearner

from rlalign_ray.config import config_from_dict
from rlalign_ray.data.prompts import load_prompts
from rlalign_ray.errors import NonFiniteError, RewardError
from rlalign_ray.learner.base import rank_batches
from rlalign_ray.roles import split_rows
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


class CheckedTrainer(Trainer):
    """Records whether every generator's weights are finite after each sync."""

    finite: list[bool]

    def broadcast(self, version: int) -> int:
        import ray

        out = super().broadcast(version)
        weights = ray.get([a.get_weights.remote() for a in self.pools["generator"].actors])
        self.finite.append(all(np.isfinite(w).all() for ws in weights for w in ws.values()))
        return out


def _cfg(tiny_model, tmp_path, **sections):
    sections.setdefault("algorithm", {"kl_coef": 0.0})
    sections.setdefault("rollout", {"num_actors": 1})
    sections.setdefault("reward", {})
    sections["reward"].setdefault("num_actors", 1)
    return config_from_dict(small_config(tiny_model, str(tmp_path / "run"), **sections))


def _metrics(tmp_path) -> list[dict]:
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def test_nan_loss_skips_the_step_and_training_goes_on(ray_local, tiny_model, tmp_path):
    cfg = _cfg(
        tiny_model,
        tmp_path,
        learner={
            "actor_class": "helpers.learners:NaNOnceLearner",
            "micro_batch_size": 2,
            "resources": {"num_cpus": 0.5},
        },
        trainer={"steps": 3, "eval_every": 0, "output_dir": str(tmp_path / "run")},
        data={"eval": None},
    )
    trainer = CheckedTrainer(cfg)
    trainer.finite = []
    trainer.fit()
    rows = [r for r in _metrics(tmp_path) if "train/skipped_steps" in r]
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 1.0, 0.0]
    assert rows[-1]["weights/version"] == 3
    assert trainer.finite == [True, True, True]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


@pytest.mark.full
def test_nan_loss_every_step_ends_the_run(ray_local, tiny_model, tmp_path):
    cfg = _cfg(
        tiny_model,
        tmp_path,
        learner={
            "actor_class": "helpers.learners:AlwaysNaNLearner",
            "max_skipped_steps": 2,
            "resources": {"num_cpus": 0.5},
        },
        trainer={"steps": 3, "eval_every": 0, "output_dir": str(tmp_path / "run")},
        data={"eval": None},
    )
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row were skipped"):
        Trainer(cfg).fit()


def _reward(path: str, **kw) -> dict:
    return {"rewards": [{"type": "function", "path": f"helpers.rewards:{path}"}], **kw}


def test_nan_reward_zero_counts_and_trains(ray_local, tiny_model, tmp_path):
    cfg = _cfg(
        tiny_model,
        tmp_path,
        reward=_reward("nan_on_first", on_nonfinite="zero"),
        data={"eval": None},
    )
    Trainer(cfg).fit()
    rows = [r for r in _metrics(tmp_path) if "reward/nonfinite" in r]
    assert len(rows) == 2 and all(r["reward/nonfinite"] >= 1 for r in rows)
    assert all(np.isfinite(r["train/reward_mean"]) for r in rows)


@pytest.mark.full
def test_nan_reward_drop_group_refills_the_step(ray_local, tiny_model, tmp_path):
    cfg = _cfg(
        tiny_model,
        tmp_path,
        reward=_reward("nan_once", on_nonfinite="drop_group"),
        data={"eval": None},
    )
    Trainer(cfg).fit()
    rows = [r for r in _metrics(tmp_path) if "reward/dropped_groups" in r]
    assert [r["reward/dropped_groups"] for r in rows] == [1.0, 0.0]
    assert rows[-1]["weights/version"] == 2


def test_nan_reward_error_names_the_reward(ray_local, tiny_model, tmp_path):
    with pytest.raises(RewardError, match="nan_on_first' returned a non-finite value"):
        Trainer(_cfg(tiny_model, tmp_path, reward=_reward("nan_on_first"))).fit()


def test_hung_reward_fails_within_reward_timeout(ray_local, tiny_model, tmp_path):
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        Trainer(_cfg(tiny_model, tmp_path, reward=_reward("hangs", timeout_s=5))).fit()
    assert "reward 'hangs' did not return within 5s (reward.timeout_s)" in str(err.value)
    assert time.monotonic() - start < 120


@pytest.mark.parametrize(
    "world, zero",
    [
        pytest.param(1, 0, marks=pytest.mark.full),
        pytest.param(2, 0, marks=pytest.mark.full),
        (2, 2),
    ],
)
def test_nan_loss_on_one_rank_skips_the_step_on_all(ray_local, tiny_model, world, zero):
    """Direct learner ranks: a NaN in micro-batch 0 of rank 0 only leaves every rank's
    weights unchanged for that step; the next step trains."""
    cfg = config_from_dict(
        small_config(
            tiny_model,
            "/tmp/unused",
            algorithm={"kl_coef": 0.0},
            learner={"world_size": world, "micro_batch_size": 2, "zero_stage": zero},
        )
    )
    gen = Generator(cfg.model, cfg.rollout, seed=0)
    batch = gen.generate(load_prompts(cfg.data.train)[:4], n_samples=2)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    rows = split_rows(len(batch), world, cfg.run.seed, 1)
    parts = rank_batches(rows, None, 1, batch)
    parts = parts if world > 1 else [parts]
    cls = ray_local.remote(NaNOnceLearner).options(num_cpus=0.25)
    actors = [cls.remote(cfg, i, world, nan_rank=0) for i in range(world)]
    try:
        addr, port = ray_local.get(actors[0].address.remote())
        ray_local.get([a.setup.remote(addr, port) for a in actors])

        def step(s):
            before = ray_local.get(actors[-1].get_weights.remote())
            calls = [a.train_step.remote(p, adv[r], 0.0, s) for a, p, r in zip(actors, parts, rows)]
            metrics = ray_local.get(calls)
            after = ray_local.get(actors[-1].get_weights.remote())
            changed = any(not np.array_equal(before[k], after[k]) for k in before)
            return metrics[0]["skipped_steps"], changed, after

        assert step(2)[:2] == (1.0, False)
        skipped, changed, after = step(3)
        assert (skipped, changed) == (0.0, True)
        assert all(np.isfinite(w).all() for w in after.values())
    finally:
        for a in actors:
            ray_local.kill(a)
