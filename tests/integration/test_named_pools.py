"""Named pools (``pools:``) under the built-in Trainer, with real actors.

- the issue's YAML (a judge reward pool with a function reward, weight 0.1, and a second
  generator pool) trains 3 pipelined steps (``trainer.max_staleness: 1``): the judge's
  reward is logged as ``train/reward/judge/<reward>``, each sample's reward is the default
  pool's plus 0.1 times the judge's, and the second pool samples chunks;
- an actor of each named pool killed mid-run (SIGKILL, by PID) is replaced; the run goes
  on, resumes from its checkpoint, and every landed sample is scored once by each reward
  pool (the rewards count what they score), every trained one once in the ledger.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import small_config
from helpers.pools import SCORED, scored
from helpers.stalls import CLAIMS

from rlalign_ray.config import config_from_dict, load_config
from rlalign_ray.ledger import read
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration

POOLS = """
pools:
  judge: {kind: reward, rewards: [{type: function, path: "helpers.pools:brevity"}],
          weight: 0.1, num_actors: 1, resources: {num_cpus: 0.25}}
  gen_b: {kind: generator, num_actors: 1, resources: {num_cpus: 0.25}}
"""


@pytest.fixture
def counters():
    for folder in (CLAIMS, SCORED):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    yield
    for folder in (CLAIMS, SCORED):
        shutil.rmtree(folder, ignore_errors=True)


def _config(model: str, out: Path, steps: int, **trainer) -> dict:
    return small_config(
        model,
        str(out),
        data={"eval": None},
        trainer={
            "steps": steps,
            "eval_every": 0,
            "output_dir": str(out),
            "tensorboard": False,
            "progress_bar": False,
            "sample_log": True,
            "max_staleness": 1,
            **trainer,
        },
    )


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _check_ledger(out: Path, steps: int) -> list[dict]:
    rows = read(out)
    assert Counter(r["step"] for r in rows) == {s: 8 for s in range(1, steps + 1)}
    keys = [(r["step"], r["prompt_index"], r["sample_index"]) for r in rows]
    assert len(set(keys)) == len(keys), "a sample is trained twice"
    return rows


@pytest.mark.parametrize(
    "dispatch_group", [0, pytest.param(1, marks=pytest.mark.full, id="dispatchers")]
)
def test_the_issue_yaml_trains_three_pipelined_steps_and_logs_the_judge(
    ray_local, tiny_model, tmp_path, dispatch_group
):
    """With dispatchers (``rollout.dispatch_group``) the same: they score for the default
    pool, and the judge scores what lands as it does without them."""
    out = tmp_path / "run"
    raw = _config(tiny_model, out, 3)
    raw.update(yaml.safe_load(POOLS))
    raw["rollout"]["dispatch_group"] = dispatch_group
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(raw))
    Trainer(load_config(path)).fit()
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    for m in metrics.values():
        judge = [k for k in m if k.startswith("train/reward/judge/")]
        assert judge == ["train/reward/judge/brevity"], sorted(m)
        total = m["train/reward/digit_fraction"] + 0.1 * m[judge[0]]
        assert m["train/reward_mean"] == pytest.approx(total, rel=1e-5, abs=1e-6)
        assert m["rollout/staleness_max"] <= 1
    assert metrics[3]["weights/version"] == 3
    rows = _check_ledger(out, 3)
    assert {r.get("pool") for r in rows} >= {"generator", "gen_b"}


@pytest.mark.full  # ~2 min on 2 cores: two runs, two actors killed
@pytest.mark.usefixtures("counters")
def test_a_killed_actor_of_each_named_pool_is_replaced_and_the_run_resumes(
    ray_local, tiny_model, tmp_path
):
    from test_dead_actors import Killer  # noqa: PLC0415 (the dead-actor tests' killer)

    out = tmp_path / "run"
    pools = {
        "judge": {
            "kind": "reward",
            "rewards": [{"type": "function", "path": "helpers.pools:stalling_judge"}],
            "weight": 0.1,
            "num_actors": 1,
            "resources": {"num_cpus": 0.25},
        },
        "gen_b": {
            "kind": "generator",
            "num_actors": 1,
            "resources": {"num_cpus": 0.25},
            "actor_class": "helpers.pools:StallingGenB",
        },
    }
    reward = {
        "rewards": [{"type": "function", "path": "helpers.pools:counted_digits"}],
        "num_actors": 2,
        "resources": {"num_cpus": 0.5},
    }
    killer = Killer([["judge", "gen_b"]])
    killer.start()
    try:
        cfg = _config(tiny_model, out, 3, save_every=1)
        Trainer(config_from_dict({**cfg, "pools": pools, "reward": reward})).fit()
    finally:
        killer.done.set()
    assert set(killer.killed) == {"judge", "gen_b"}, killer.killed
    assert _metrics(out)[3]["run/actor_restarts"] == 2
    first = scored("reward")
    assert first > 0 and scored("judge") == first, "each pool scores every sample once"
    cfg = _config(tiny_model, out, 4, save_every=1, resume="auto")
    Trainer(config_from_dict({**cfg, "pools": pools, "reward": reward})).fit()
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all("train/reward/judge/stalling_judge" in m for m in metrics.values())
    assert scored("reward") > first and scored("judge") == scored("reward")
    _check_ledger(out, 4)
