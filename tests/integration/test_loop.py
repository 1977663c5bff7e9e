"""The whole loop on a real local Ray instance: generators, reward pool, reference,
a 2-rank DeepSpeed learner, and the weight broadcast (each transport)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


class CheckingTrainer(Trainer):
    """After each broadcast, compare every generator's weights with the learner's."""

    checked: list[int]

    def broadcast(self, version: int) -> int:
        import ray

        before = ray.get(self.pools["generator"].actors[0].get_weights.remote())
        nbytes = super().broadcast(version)
        learner = ray.get([r.get_weights.remote() for r in self.pools["learner"].actors])
        for rank_weights in learner[1:]:  # data-parallel ranks hold the same weights
            _assert_same(learner[0], rank_weights)
        for gen in self.pools["generator"].actors:
            assert ray.get(gen.get_version.remote()) == version
            _assert_same(learner[0], ray.get(gen.get_weights.remote()))
        changed = any(not np.array_equal(before[k], learner[0][k]) for k in before)
        self.checked.append((version, changed))
        return nbytes


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# each transport once, ZeRO-3 (a bucket's parameters gathered at a time) with the collective one
@pytest.mark.parametrize(
    "zero_stage,transport",
    [pytest.param(2, "object_store", marks=pytest.mark.full), (3, "collective")],
)
def test_three_steps_two_generators_two_reward_actors_two_ranks(
    ray_local, tiny_model, tmp_path, zero_stage, transport
):
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            learner={
                "world_size": 2,
                "zero_stage": zero_stage,
                "micro_batch_size": 2,
                "lr": 1e-3,
                "resources": {"num_cpus": 0.5},
            },
            trainer={"steps": 3, "eval_every": 2, "save_every": 2},
            sync={"transport": transport, "bucket_mb": 0.5},  # several buckets
        )
    )
    trainer = CheckingTrainer(cfg)
    trainer.checked = []
    final = trainer.fit()

    assert [v for v, _ in trainer.checked] == [1, 2, 3]
    assert all(changed for _, changed in trainer.checked), "the update did not change the weights"
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in (
        "train/reward_mean",
        "train/kl",
        "train/loss",
        "train/response_len",
        "weights/version",
        "time/step_s",
        "time/generate_s",
        "time/reward_s",
        "time/train_s",
        "time/sync_s",
    ):
        assert all(key in r for r in rows[1:]), key
    assert (
        "eval/reward_mean" in rows[0]
        and "eval/reward_mean" in rows[2]
        and "eval/reward_mean" in rows[3]
    )
    assert rows[3]["weights/version"] == 3
    # generator and learner compute the same log-probs for the same weights
    assert all(r["train/logprob_mismatch"] < 1e-4 for r in rows[1:])
    assert final["weights/version"] == 3
    # checkpoint and final policy load with from_pretrained
    from transformers import AutoModelForCausalLM

    for sub in ("checkpoints/step_2", "final"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / sub)
        assert model.num_parameters() > 0
