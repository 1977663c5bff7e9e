"""Resumable checkpoints (``rlalign_ray/checkpoint.py``) and run folders.

- a run resumed from a checkpoint logs the same metrics for every later step as the run
  that never stopped (synchronous training, CPU, fixed seed);
- the same after the driver and every process it started are killed with SIGKILL after
  step 3 is logged, resumed with ``trainer.resume=auto`` from the command line; also
  pipelined (``trainer.max_staleness`` 1 and 2, HF and vLLM generators): the checkpoint
  holds the chunks sampled for later steps (the rollout buffer), and the sample ledger
  shows every prompt trained once, with the same samples as the run that never stopped;
- a new run into a folder that already holds one is refused, naming both ways out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO, small_config
from helpers.resume import assert_same, metric_rows

from rlalign_ray import checkpoint, ledger
from rlalign_ray.config import config_from_dict
from rlalign_ray.errors import ConfigError
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration
VLLM = [
    pytest.mark.full,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]


def _config(model: str, out: Path, steps: int = 4, **trainer) -> dict:
    return small_config(
        model,
        str(out),
        data={"eval": None},
        algorithm={"name": "grpo", "kl_coef": 0.01, "kl_target": 0.05, "kl_horizon": 100},
        learner={"lr_warmup_steps": 4},  # DeepSpeed's scheduler: its state must resume too
        trainer={
            "steps": steps,
            "save_every": 2,
            "eval_every": 0,
            "output_dir": str(out),
            "tensorboard": False,
            "progress_bar": False,
            **trainer,
        },
    )


def _rows(out: Path) -> dict[int, dict]:
    return metric_rows((out / "metrics.jsonl").read_text())


def _ledgers_equal(straight: Path, killed: Path) -> None:
    """Both runs trained the same samples (prompt, sample, weight version) at every step,
    and no prompt twice (one epoch); which generator sampled a chunk may differ."""
    rows = [
        [{k: v for k, v in r.items() if k != "generator"} for r in ledger.read(out)]
        for out in (straight, killed)
    ]
    assert rows[0] == rows[1]
    by_step = {(r["step"], r["prompt_index"]) for r in rows[1]}
    assert len({p for _, p in by_step}) == len(by_step), "a prompt was trained twice"


@pytest.mark.full
def test_resumed_run_logs_the_same_metrics_as_the_straight_run(ray_local, tiny_model, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(config_from_dict(_config(tiny_model, straight))).fit()
    Trainer(config_from_dict(_config(tiny_model, resumed, steps=2))).fit()
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_2"
    Trainer(config_from_dict(_config(tiny_model, resumed, resume="auto"))).fit()
    a, b = _rows(straight), _rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert_same(a, b, [1, 2, 3, 4])
    assert [b[s]["train/lr"] for s in a] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # the last trainer.keep_checkpoints (2) complete checkpoints are kept, nothing half-written
    names = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert names == ["latest", "step_2", "step_4"]
    state = checkpoint.TrainerState.read(resumed / "checkpoints" / "step_4")
    assert (state.step, state.version) == (4, 4)


@pytest.mark.full
def test_ppo_with_a_critic_and_two_zero2_ranks_resumes_exactly(ray_local, tiny_model, tmp_path):
    ranks = {"world_size": 2, "zero_stage": 2, "micro_batch_size": 2}
    sections = {
        "algorithm": {"name": "ppo", "kl_coef": 0.05, "kl_in_reward": True, "lam": 0.95},
        "rollout": {"n_samples": 1, "prompts_per_step": 4, "num_actors": 1},
        "reward": {"num_actors": 1},
        "learner": {**ranks, "lr": 1e-3, "resources": {"num_cpus": 0.5}},
        "critic": {**ranks, "lr": 1e-3, "resources": {"num_cpus": 0.5}},
        "run": {"call_timeout_s": 900},  # six ranks and actors starting on a busy machine
    }

    def config(out: Path, steps: int, **trainer) -> dict:
        cfg = _config(tiny_model, out, steps, **trainer)
        return {**cfg, **{k: {**cfg.get(k, {}), **v} for k, v in sections.items()}}

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(config_from_dict(config(straight, 3))).fit()
    Trainer(config_from_dict(config(resumed, 2))).fit()
    assert (resumed / "checkpoints" / "step_2" / "critic").is_dir()
    Trainer(config_from_dict(config(resumed, 3, resume="auto"))).fit()
    a, b = _rows(straight), _rows(resumed)
    assert_same(a, b, [3])
    assert b[3]["critic/value_loss"] == pytest.approx(a[3]["critic/value_loss"], rel=1e-6)


def test_a_new_run_never_writes_into_an_old_one(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="trainer.resume=auto or pick another"):
        Trainer(config_from_dict(_config(tiny_model, out))).fit()
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(ConfigError, match="trainer.resume"):
        config_from_dict(_config(tiny_model, out, resume=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="trainer.keep_checkpoints"):
        config_from_dict(_config(tiny_model, out, keep_checkpoints=-1))


# ---- killed with SIGKILL, resumed from the command line ------------------------------------
def _train(config: Path, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    cmd = [sys.executable, "-m", "rlalign_ray.cli", "train", str(config), *overrides]
    return subprocess.Popen(
        cmd,
        cwd=config.parent,
        env=env,
        start_new_session=True,  # its own process group: the driver and what it starts
        stdout=subprocess.DEVNULL,
        stderr=open(config.parent / f"{config.stem}.{time.monotonic_ns()}.log", "w"),  # noqa: SIM115
    )


def _finish(proc: subprocess.Popen, timeout_s: float = 600) -> None:
    try:
        assert proc.wait(timeout_s) == 0, f"training exited with {proc.returncode}"
    finally:
        if proc.poll() is None:
            _kill_all(proc)


def _family(pid: int) -> list[psutil.Process]:
    """The process and every descendant (Ray's GCS, raylet, workers ...)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_all(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the driver's process group and every process it started (also any that
    left the group), and wait until none is alive."""
    family = _family(proc.pid)
    sessions = {p.pid for p in family}
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"
    # nothing else of the session survived either (a daemon that left the tree)
    left = [p for p in psutil.process_iter(["pid"]) if p.pid in sessions or _sid(p) == proc.pid]
    assert not left, f"still running after SIGKILL: {left}"
    return family


def _sid(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


# pipelined: pulled chunks (seeded); k = 2 with a static split (each generator's own stream)
PIPELINED = {
    0: {},
    1: {"rollout.chunk_size": 1},
    2: {"rollout.chunk_size": 0, "rollout.prompts_per_step": 6},
    "dispatch": {"rollout.chunk_size": 1, "rollout.dispatch_group": 1},
    "vllm": {"rollout.chunk_size": 1, "rollout.backend": "vllm",
             "rollout.vllm": {"kv_cache_gb": 0.25, "max_model_len": 64}},
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        # synchronous SIGKILL and resume: default tier in test_storage.py (2 nodes, a bucket)
        pytest.param(0, marks=pytest.mark.full),
        1,
        *[pytest.param(c, marks=pytest.mark.full) for c in (2, "dispatch")],
        pytest.param("vllm", marks=VLLM),
    ],
)
def test_killed_run_resumes_with_the_same_metrics(tiny_model, tmp_path, case):
    """SIGKILL once step 3 is logged (the latest checkpoint is then step 2's, or step 4's
    on a busy machine), resume: every later step logs what the straight run logs.
    Pipelined, the steps after the checkpoint were sampled before it (the buffer)."""
    k, steps = (case if isinstance(case, int) else 1), 6
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for out in (straight, killed):
        cfg = _config(tiny_model, out, steps, max_staleness=k, sample_log=True)
        for key, value in PIPELINED[case].items():
            section, name = key.split(".")
            cfg[section][name] = value
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    _finish(_train(tmp_path / "straight.yaml"))
    t_straight = time.monotonic() - t0

    proc = _train(tmp_path / "killed.yaml")
    metrics = killed / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600
        while not (metrics.exists() and '"step": 3' in metrics.read_text()):
            assert proc.poll() is None, f"training exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "step 3 was never logged"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)  # the driver logs nothing more while we gather
    finally:
        family = _kill_all(proc)
    assert len(family) > 3  # the driver, Ray's daemons and the actors' workers
    logged = sorted(_rows(killed))
    assert logged == list(range(1, len(logged) + 1)) and 3 <= len(logged) < steps
    ckpt = Path(checkpoint.latest(killed / "checkpoints"))
    saved = checkpoint.TrainerState.read(ckpt).step
    assert saved in (2, 4) and saved <= len(logged)
    buffered = json.loads((ckpt / "rollout_buffer" / "buffer.json").read_text())
    assert [s["step"] for s in buffered["steps"]] == list(range(saved + 1, saved + 1 + k))

    _finish(_train(tmp_path / "killed.yaml", "trainer.resume=auto"))
    a, b = _rows(straight), _rows(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert_same(a, b, range(saved + 1, steps + 1), every=True)
    assert [b[s]["rollout/staleness_max"] for s in b] == [min(s - 1, k) for s in b]
    _ledgers_equal(straight, killed)
    print(f"straight run {t_straight:.0f}s, whole test {time.monotonic() - t0:.0f}s")


@pytest.mark.full
def test_lora_with_two_zero2_ranks_resumes_exactly(ray_local, tiny_model, tmp_path):
    """LoRA adapters under ZeRO-2 on two ranks: the checkpoint holds the adapters and their
    optimizer state, and the resumed step 3 is the straight run's."""
    pytest.importorskip("peft")
    learner = {
        "world_size": 2,
        "zero_stage": 2,
        "micro_batch_size": 2,
        "lr": 1e-2,
        "resources": {"num_cpus": 0.5},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }

    def config(out: Path, steps: int, **trainer) -> dict:
        cfg = _config(tiny_model, out, steps, **trainer)
        cfg["learner"] = {**cfg["learner"], **learner}
        return cfg

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(config_from_dict(config(straight, 3))).fit()
    Trainer(config_from_dict(config(resumed, 2))).fit()
    Trainer(config_from_dict(config(resumed, 3, resume="auto"))).fit()
    a, b = _rows(straight), _rows(resumed)
    assert sorted(b) == [1, 2, 3]
    assert_same(a, b, [3])
    assert all(r["train/logprob_mismatch"] < 1e-4 for r in b.values())
    assert (resumed / "final" / "adapter_config.json").exists()
