"""In-flight weight updates in a real pipelined run: generators in Ray actors load each new
version between two decode steps of the chunk they sample (``rollout.inflight_updates``);
HF, and vLLM in the extended tier (its engine runs in the actor's default-group thread, the
loads come in the ``weights`` thread).

One chunk per generator and step; from step 2 on each generator holds its chunk at the
second decode step until the new version's load arrives (``helpers.inflight``), so every
such chunk spans two versions whatever the machine's timing.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


class BatchTrainer(Trainer):
    """Records the batches each step trains, with the learner's version then."""

    def learn(self, exp, step):
        import ray

        self.seen.append((self.version, ray.get(exp.batch_refs(60), timeout=60)))
        return super().learn(exp, step)

    def fit(self):
        self.seen = []
        return super().fit()


VLLM = pytest.param(
    {"backend": "vllm", "vllm": {"kv_cache_gb": 0.25, "max_model_len": 64}},
    marks=[
        pytest.mark.full,
        pytest.mark.vllm,
        pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vllm"),
    ],
    id="vllm",
)


@pytest.mark.parametrize("engine", [pytest.param({}, id="hf"), VLLM])
def test_pipelined_run_loads_weights_mid_chunk_and_records_each_tokens_version(
    ray_local, tiny_model, tmp_path, engine
):
    out = tmp_path / "run"
    raw = small_config(
        tiny_model,
        str(out),
        rollout={
            "prompts_per_step": 4,
            "n_samples": 4,
            "max_new_tokens": 12,
            "ignore_eos": True,
            "actor_class": "helpers.inflight:HoldingGenerator",
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
            "inflight_updates": True,
            **engine,
        },
        learner={"world_size": 1, "micro_batch_size": 16, "resources": {"num_cpus": 0.5}},
        trainer={"steps": 3, "eval_every": 0, "max_staleness": 1, "output_dir": str(out)},
    )
    raw["data"].pop("eval")
    trainer = BatchTrainer(config_from_dict(raw))
    rows = [r for r in _rows(out, trainer) if r["step"] > 0]
    assert [r["rollout/inflight_loads"] for r in rows] == [0, 2, 2]  # both generators
    for (learner, batches), row in zip(trainer.seen, rows):
        lags = []
        for b in batches:
            v, sampled = b.token_versions, b.response_mask > 0
            assert (v[~sampled] == -1).all() and (v[sampled] >= 0).all()
            assert int(v[sampled].min()) == b.version >= learner - 1  # the oldest token
            assert int(v.max()) <= learner
            ordered = v.masked_fill(~sampled, 1 << 30)  # versions only grow along a row
            assert (ordered[:, 1:] >= ordered[:, :-1]).all()
            lags += (learner - v[sampled]).tolist()
        assert row["rollout/version_lag_mean"] == pytest.approx(sum(lags) / len(lags))
        assert row["rollout/staleness_max"] <= 1


def _rows(out, trainer):
    import json

    trainer.fit()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
