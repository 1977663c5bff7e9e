"""Every algorithm runs through the real loop: PPO with its critic group, the GRPO family,
REINFORCE++ with KL in the reward, DAPO's dynamic sampling and overlong penalty, and the
policy losses (a user's module:function, gspo, cispo) with the sequence-level mismatch mask."""

from __future__ import annotations

import json

import pytest
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_ppo_with_critic(ray_local, tiny_model, tmp_path):
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            algorithm={
                "name": "ppo",
                "kl_coef": 0.05,
                "kl_in_reward": True,
                "gamma": 1.0,
                "lam": 0.95,
            },
            rollout={"n_samples": 1, "prompts_per_step": 4, "num_actors": 1},
            reward={"num_actors": 1},
            critic={"micro_batch_size": 2, "lr": 1e-3, "resources": {"num_cpus": 0.5}},
            learner={"micro_batch_size": 2, "update_epochs": 2, "resources": {"num_cpus": 0.5}},
        )
    )
    Trainer(cfg).fit()
    rows = _rows(tmp_path / "run")
    assert all("critic/value_loss" in r and "train/kl" in r for r in rows[1:])
    assert rows[-1]["weights/version"] == 2


@pytest.mark.parametrize(
    "name",
    [
        "rloo",
        pytest.param("reinforce_pp_baseline", marks=pytest.mark.full),
        pytest.param("dr_grpo", marks=pytest.mark.full),
    ],
)
def test_group_estimators(ray_local, tiny_model, tmp_path, name):
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            algorithm={"name": name, "kl_coef": 0.0},
            rollout={"num_actors": 1},
            reward={"num_actors": 1},
            trainer={"steps": 1},
        )
    )
    Trainer(cfg).fit()
    assert _rows(tmp_path / "run")[-1]["weights/version"] == 1


def test_reinforce_pp_kl_in_reward_dynamic_sampling_overlong(ray_local, tiny_model, tmp_path):
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            algorithm={
                "name": "reinforce_pp",
                "kl_coef": 0.01,
                "kl_in_reward": True,
                "dynamic_sampling": True,
                "max_refills": 1,
                "overlong_buffer": 2,
                "kl_target": 0.1,
                "behaviour_is_cap": 2.0,
                "entropy_coef": 0.01,
            },
            rollout={"num_actors": 1},
            reward={"num_actors": 1},
        )
    )
    Trainer(cfg).fit()
    rows = _rows(tmp_path / "run")
    for key in (
        "train/informative_groups",
        "train/refills",
        "train/overlong_penalty",
        "train/kl",
        "train/kl_coef",
        "train/behaviour_is_weight",
        "train/mismatch_kl",
    ):
        assert key in rows[-1], key


@pytest.mark.parametrize(
    "loss",
    [
        "helpers.objectives:reinforce_loss",  # a user's loss, imported by the learner ranks
        pytest.param("gspo", marks=pytest.mark.full),
        pytest.param("cispo", marks=pytest.mark.full),
    ],
)
def test_policy_losses_train(ray_local, tiny_model, tmp_path, loss):
    """With the user's loss, the user's estimator too (per sequence: one value per row)."""
    user = loss.startswith("helpers.")
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            algorithm={
                "name": "helpers.objectives:median_baseline" if user else "grpo",
                "kl_coef": 0.0,
                "policy_loss": loss,
                "behaviour_seq_mask": [0.5, 2.0],
            },
            rollout={"num_actors": 1},
            reward={"num_actors": 1},
        )
    )
    Trainer(cfg).fit()
    rows = _rows(tmp_path / "run")
    assert rows[-1]["weights/version"] == 2
    for key in ("train/loss", "train/ratio_mean", "train/mismatch_kl", "train/seq_masked_frac"):
        assert all(key in r and r[key] == r[key] for r in rows[1:]), key  # present, not NaN
