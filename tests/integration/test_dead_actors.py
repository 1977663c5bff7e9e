"""Actors that die mid-step (SIGKILL, by PID) in a real run.

- a generator, a reward actor and the reference actor killed in the middle of step 2 are
  replaced in their bundles; the generator's chunk is sampled again with the current
  weights, the reward's and the reference's chunk computed again: every step completes,
  and the ledger (``samples.jsonl``) holds each step's prompts x samples exactly once;
- a learner rank killed in step 3 restarts the group from step 2's checkpoint inside the
  run (``run.max_learner_restarts``); without restarts left the run stops, naming the
  checkpoint and ``trainer.resume=auto``; in a pipelined run the restarted steps train on
  the checkpoint's rollout buffer and log what the run without a kill logs. With generators
  that sleep while the learner trains (a backend that sleeps, ``SleepingHF``, played by
  ``SleepLogGenerator``), the rank's death still wakes them, and no weights are loaded into a
  sleeping generator.
(``test_failures.py`` checks ``run.max_actor_restarts`` running out.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import small_config
from helpers.stalls import CLAIMS, SLEEP_LOG

from rlalign_ray.config import Config, config_from_dict
from rlalign_ray.errors import ActorFailure
from rlalign_ray.ledger import read
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


class Killer(threading.Thread):
    """Arms the stalls in ``plan`` (rounds of names, armed together), and SIGKILLs each
    process that stalls in one, then arms the next round."""

    def __init__(self, plan: list[list[str]]):
        super().__init__(daemon=True)
        self.plan, self.killed, self.done = plan, {}, threading.Event()

    def run(self) -> None:
        for names in self.plan:
            for name in names:
                (CLAIMS / f"{name}.arm").touch()
            left = set(names)
            while left and not self.done.is_set():
                for name in list(left):
                    found = [p for p in CLAIMS.glob(f"{name}.*") if p.suffix[1:].isdigit()]
                    if found:
                        pid = int(found[0].suffix[1:])
                        os.kill(pid, signal.SIGKILL)
                        found[0].unlink()  # a later Killer must not take it for its own
                        self.killed[name] = pid
                        left.discard(name)
                time.sleep(0.05)


@pytest.fixture
def claims():
    shutil.rmtree(CLAIMS, ignore_errors=True)
    CLAIMS.mkdir(parents=True)
    yield CLAIMS
    shutil.rmtree(CLAIMS, ignore_errors=True)


def _config(model: str, out: Path, steps: int, **sections) -> dict:
    sections.setdefault("trainer", {})
    sections["trainer"] = {
        "steps": steps,
        "eval_every": 0,
        "output_dir": str(out),
        "tensorboard": False,
        "progress_bar": False,
        "sample_log": True,
        **sections["trainer"],
    }
    return small_config(model, str(out), data={"eval": None}, **sections)


def _check_ledger(
    out: Path, steps: int, prompts: int = 4, n: int = 2, versions: bool = True
) -> list[dict]:
    rows = read(out)
    per_step = Counter(r["step"] for r in rows)
    assert per_step == {s: prompts * n for s in range(1, steps + 1)}, per_step
    keys = [(r["step"], r["prompt_index"], r["sample_index"]) for r in rows]
    assert len(set(keys)) == len(keys), "a sample is trained twice"
    for s in range(1, steps + 1):
        mine = [r for r in rows if r["step"] == s]
        assert len({r["prompt_index"] for r in mine}) == prompts
        assert Counter(r["sample_index"] for r in mine) == {k: prompts for k in range(n)}
        if versions:  # synchronous: the latest weights
            assert {r["version"] for r in mine} == {s - 1}
    return rows


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "a step is logged twice"
    return {r["step"]: r for r in rows}


@pytest.mark.parametrize(
    "dispatch_group", [0, pytest.param(1, marks=pytest.mark.full, id="dispatchers")]
)
def test_dead_generator_reward_and_reference_are_replaced(
    ray_local, tiny_model, tmp_path, claims, dispatch_group
):
    """With dispatchers (``rollout.dispatch_group``) too: a dispatcher reports the generator
    that died with the chunks it took, and a run's joined scores that lost a reward actor
    are scored again."""
    out = tmp_path / "run"
    cfg = _config(
        tiny_model,
        out,
        3,
        rollout={
            "prompts_per_step": 4,
            "n_samples": 2,
            "max_new_tokens": 4,
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
            "actor_class": "helpers.stalls:StallingGenerator",
            "dispatch_group": dispatch_group,
        },
        reward={
            "rewards": [{"type": "function", "path": "helpers.stalls:stalling_reward"}],
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
        },
        reference={
            "resources": {"num_cpus": 0.5},
            "actor_class": "helpers.stalls:StallingReference",
        },
    )
    killer = Killer([["generator"], ["reward", "reference"]])
    killer.start()
    start = time.monotonic()
    try:
        Trainer(config_from_dict(cfg)).fit()
    finally:
        killer.done.set()
    took = time.monotonic() - start
    assert set(killer.killed) == {"generator", "reward", "reference"}, killer.killed
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    assert metrics[3]["run/actor_restarts"] == 3
    assert metrics[3]["weights/version"] == 3
    _check_ledger(out, 3)
    print(
        f"run with three actors killed: {took:.1f}s",
        [round(m["time/step_s"], 1) for m in metrics.values()],
    )


STALLING_LEARNER = {
    "world_size": 1,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "resources": {"num_cpus": 0.5},
    "actor_class": "helpers.stalls:StallingLearner",
}


def _fit_killing(name: str, cfg: dict | Config) -> Killer:
    """Train ``cfg`` while a ``Killer`` SIGKILLs the actor that stalls at ``name``."""
    killer = Killer([[name]])
    killer.start()
    try:
        Trainer(cfg if isinstance(cfg, Config) else config_from_dict(cfg)).fit()
    finally:
        killer.done.set()
    return killer


def test_dead_learner_rank_restarts_from_the_checkpoint(ray_local, tiny_model, tmp_path, claims):
    out = tmp_path / "run"
    sections = {
        "algorithm": {"kl_coef": 0.0},  # no reference: fewer actors
        "learner": STALLING_LEARNER,
        "trainer": {"save_every": 2},
    }
    # no restarts: the run stops naming the checkpoint and how to resume
    with pytest.raises(ActorFailure) as err:
        _fit_killing("learner", _config(tiny_model, out, 4, **sections))
    msg = str(err.value)
    assert "learner rank 0 died" in msg and "trainer.resume=auto" in msg, msg
    assert str(out / "checkpoints" / "step_2") in msg and "(step 2)" in msg, msg
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    # with a restart: the group starts again from step 2's checkpoint and the run completes;
    # generators asleep while the learner trains are woken when its rank dies
    out2 = tmp_path / "run2"
    sections["run"] = {"max_learner_restarts": 1}
    sections["rollout"] = {
        "actor_class": "helpers.stalls:SleepLogGenerator",
        "backend": "helpers.stalls:SleepingHF",  # a backend that sleeps; the class plays it
    }
    cfg = config_from_dict(_config(tiny_model, out2, 4, **sections))
    shutil.rmtree(SLEEP_LOG, ignore_errors=True)
    killer = _fit_killing("learner", cfg)
    assert "learner" in killer.killed
    assert sorted(_metrics(out2)) == [1, 2, 3, 4]
    _check_ledger(out2, 4)
    _check_sleep_log(updates=5)  # steps 1-4, and the update of step 3 the kill cut short


def _check_sleep_log(updates: int) -> None:
    """Each generator slept once per update and woke after each (the killed one too), and
    loaded every weight version awake."""
    logs = [p.read_text().split("\n")[:-1] for p in SLEEP_LOG.iterdir()]
    shutil.rmtree(SLEEP_LOG, ignore_errors=True)
    assert logs
    for events in logs:
        assert [e for e in events if e.startswith(("sleep", "wake"))] == [
            "sleep awake",
            "wake asleep",
        ] * updates, events
        assert "load asleep" not in events and "load awake" in events, events


@pytest.mark.full
def test_dead_learner_rank_in_a_pipelined_run_continues_exactly(
    ray_local, tiny_model, tmp_path, claims
):
    """Pipelined (k = 1, pulled chunks): the learner rank killed in step 3 restarts from
    step 2's checkpoint, whose rollout buffer holds step 3's chunks; steps 3 and 4 log what
    the run without a kill logs, and train the same samples."""
    sections = {
        "algorithm": {"kl_coef": 0.0},
        "rollout": {"chunk_size": 1},
        "learner": STALLING_LEARNER,
        "trainer": {"save_every": 2, "max_staleness": 1},
        "run": {"max_learner_restarts": 1},
    }
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    Trainer(config_from_dict(_config(tiny_model, straight, 4, **sections))).fit()
    killer = _fit_killing("learner", _config(tiny_model, killed, 4, **sections))
    assert "learner" in killer.killed
    a, b = _metrics(straight), _metrics(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in (k for k in a[step] if not k.startswith(("time/", "run/"))):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
    same = [
        [{k: v for k, v in r.items() if k != "generator"} for r in read(out)]
        for out in (straight, killed)
    ]
    assert same[0] == same[1]
    _check_ledger(killed, 4, versions=False)
