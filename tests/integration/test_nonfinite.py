"""Non-finite values and time limits: a NaN loss skips one optimizer step, NaN rewards
follow ``reward.on_nonfinite``, a hung reward fails within ``reward.timeout_s``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.errors import NonFiniteError
from rlalign_ray.trainer import Trainer

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
