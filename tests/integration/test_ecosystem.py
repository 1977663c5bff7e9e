"""One 2-step run through the ecosystem features: every logger backend, sampled completions,
several eval sets with k samples (pass@k, mean@k) and a learning-rate schedule (train/lr)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO, small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration

OPTIONAL = [m for m in ("wandb", "mlflow") if importlib.util.find_spec(m) is not None]


def test_loggers_completions_eval_sets_and_lr_schedule(
    ray_local, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    evals = str(REPO / "configs/data/arith_eval.jsonl")
    out = tmp_path / "run"
    raw = small_config(
        tiny_model,
        str(out),
        data={
            "train": str(REPO / "configs/data/arith_train.jsonl"),
            "eval": {"sums": evals, "again": evals},
            "eval_limit": 3,
        },
        reward={
            "rewards": [
                {"type": "function", "path": "helpers.rewards:digit_fraction", "weight": 0.5},
                {"type": "function", "path": "helpers.rewards:uses_answer", "weight": 2.0},
            ],
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
        },
        rollout={"eval_temperature": 1.0},
        learner={
            "micro_batch_size": 4,
            "lr": 1e-3,
            "lr_scheduler": "linear",
            "resources": {"num_cpus": 0.5},
        },
        trainer={
            "loggers": ["jsonl", "tensorboard", "console", *OPTIONAL],
            "tensorboard": True,
            "log_completions": 3,
            "eval_n_samples": 2,
            "eval_pass_threshold": 0.25,
        },
    )
    Trainer(config_from_dict(raw)).fit()

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in (rows[0], rows[2]):  # step 0 and the last step evaluate each set
        for name in ("sums", "again"):
            for key in ("reward_mean", "pass@1", "pass@2", "mean@2", "reward/uses_answer"):
                assert f"eval/{name}/{key}" in r, (key, sorted(r))
            assert r[f"eval/{name}/pass@1"] <= r[f"eval/{name}/pass@2"]
        assert "eval/reward_mean" not in r
    # linear decay over 2 optimizer steps, no warm-up: the full lr, then half
    assert [r["train/lr"] for r in rows[1:]] == pytest.approx([1e-3, 5e-4])

    done = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in done] == [1, 1, 1, 2, 2, 2]
    for r in done:
        assert r["prompt"].endswith("=") and isinstance(r["completion"], str)
        want = 0.5 * r["reward/digit_fraction"] + 2.0 * r["reward/uses_answer"]
        assert r["reward"] == pytest.approx(want)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    if "wandb" in OPTIONAL:
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    if "mlflow" in OPTIONAL:
        run_id = (out / "mlflow_run_id").read_text()
        (lr,) = list((out / "mlruns").glob(f"*/{run_id}/metrics/train/lr"))
        assert len(lr.read_text().splitlines()) == 2
        assert list((out / "mlruns").glob(f"*/{run_id}/metrics/eval/sums/pass_at_2"))
