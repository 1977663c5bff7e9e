"""The simulated actors of ``bench pipeline --simulate`` and ``bench scale``: their timing
model, the values they hand back, and that generator and reward processes stay torch-free."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rlalign_ray.bench.simulated import (
    SimulatedGenerator,
    SimulatedLearner,
    SimulatedRewardScorer,
    Workload,
)
from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.errors import ActorFailure, ConfigError
from rlalign_ray.sync.buckets import plan_buckets
from rlalign_ray.sync.plan import SyncPlan, WeightHandle


def test_workload_parses_times_and_a_lognormal_tail():
    w = Workload.parse("gen=0.2,train=0.3,tail=lognormal:1.0,reward=0.01", 256, 4)
    assert (w.gen_s, w.train_s, w.tail_sigma, w.reward_s) == (0.2, 0.3, 1.0, 0.01)
    assert w.row_s == pytest.approx(0.2 * 4 / 256)
    for bad in ("gen=-1", "speed=2", "tail=normal:1", "gen"):
        with pytest.raises(ConfigError, match="--simulate"):
            Workload.parse(bad, 1, 1)


def test_length_factors_have_mean_one_and_depend_only_on_prompt_and_sample():
    w = Workload.parse("gen=1,tail=lognormal:1.0", 8, 1)
    factors = [f for i in range(3000) for f in w.factors(i, 4)]
    assert sum(factors) / len(factors) == pytest.approx(1.0, abs=0.08)
    assert w.factors(7, 4) == w.factors(7, 4)
    assert Workload.parse("gen=1", 8, 1).factors(7, 3) == [1.0, 1.0, 1.0]
    # a chunk costs its rows times its longest sample
    assert w.chunk_s([1.0, 3.0]) == pytest.approx(w.row_s * 2 * 3.0)


def test_the_actors_answer_as_the_real_ones_do():
    work = Workload.parse("gen=0,train=0", 4, 1)
    gen = type("SimulatedGenerator", (SimulatedGenerator,), {"work": work})(None, None, 0, 3)
    items = [PromptItem(5, "a"), PromptItem(9, "b")]
    batch, info = gen.generate_chunk(items, 2, expected_version=0)
    assert batch.group_ids == [5, 5, 9, 9] and len(batch) == 4
    assert info["version"] == 0 and info["rows"] == 4 and info["tokens"] == sum(batch.lengths)
    plan = SyncPlan("object_store", "gloo", "float32", plan_buckets([("w", (1,))], _f32(), 4), 1, 2)
    gen.join_weight_sync(plan, None, 1)
    assert gen.load_weights(WeightHandle(1, 0)) == 1 == gen.get_version()
    with pytest.raises(ActorFailure, match="holds weight version 1"):
        gen.generate_chunk(items, 2, expected_version=0)
    shard = pickle.loads(pickle.dumps(SimulatedRewardScorer(None).score(batch)))
    assert isinstance(shard, ScoredShard) and len(shard) == 4
    assert shard.response_mask.shape == (4, max(batch.lengths))
    learner = SimulatedLearner(None, 0, 1)
    assert learner.split_batches([[0, 1], [2, 3]], None, 1, batch) == [
        {"rows": 2, "versions": [0]},
        {"rows": 2, "versions": [0]},
    ]


def _f32():
    import torch

    return torch.float32


def test_generator_and_reward_processes_need_no_torch():
    """What the driver sends a generator (prompts, the sync plan, weight handles) and what a
    reward actor receives unpickle without importing torch."""
    plan = SyncPlan("object_store", "gloo", "float32", plan_buckets([("w", (1,))], _f32(), 4), 1, 2)
    work = Workload.parse("gen=0", 1, 1)
    gen = type("SimulatedGenerator", (SimulatedGenerator,), {"work": work})(None, None, 0)
    batch, _ = gen.generate_chunk([PromptItem(0, "p")], 1)
    payload = pickle.dumps([PromptItem(0, "p"), plan, WeightHandle(1, 0), batch])
    code = (
        "import pickle, sys; import rlalign_ray.bench.simulated, rlalign_ray.runtime.dispatch; "
        f"pickle.loads({payload!r}); print('torch' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "False"
