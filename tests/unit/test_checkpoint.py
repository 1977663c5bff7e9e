"""Checkpoint folders (written aside, renamed, pruned), run folders and metrics on resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlalign_ray import checkpoint
from rlalign_ray.errors import ConfigError
from rlalign_ray.run_log import MetricsLogger


def _save(out, step: int, keep: int = 2):
    tmp = checkpoint.begin(str(out), step)
    assert Path(tmp).name == f".tmp-step_{step}" and Path(tmp).is_dir()
    checkpoint.TrainerState(step, step, {"epoch": 0, "pos": step}, 0.1, {"trained": step}).write(
        tmp
    )
    return checkpoint.commit(tmp, step, keep)


def _name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def test_checkpoints_are_renamed_when_complete_and_the_last_ones_kept(tmp_path):
    root = Path(checkpoint.checkpoints_dir(tmp_path))
    for step in (2, 4, 6):
        _save(tmp_path, step)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_6"]
    assert _name(checkpoint.latest(root)) == "step_6"
    state = checkpoint.TrainerState.read(root / "step_6")
    assert (state.step, state.sampler, state.totals) == (6, {"epoch": 0, "pos": 6}, {"trained": 6})
    # a save cut short leaves only its .tmp- folder: never taken for a checkpoint, removed
    (root / ".tmp-step_8").mkdir()
    (root / "step_10").mkdir()  # no trainer_state.json: not complete
    assert _name(checkpoint.prepare_run(str(tmp_path), "auto")) == "step_6"
    assert not (root / ".tmp-step_8").exists()
    # keep_checkpoints = 0 keeps all
    for step in (8, 10, 12):
        _save(tmp_path, step, keep=0)
    assert [_name(p) for p in checkpoint.complete(root)] == ["step_4", "step_6", "step_8"] + [
        "step_10",
        "step_12",
    ]


def test_resume_modes_and_used_folders(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.prepare_run(str(out), "none") is None  # absent
    out.mkdir()
    assert checkpoint.prepare_run(str(out), "none") is None  # empty
    assert checkpoint.prepare_run(str(out), "auto") is None  # nothing to resume: fresh
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run; resume it with trainer.resume"):
        checkpoint.prepare_run(str(out), "none")
    ckpt = _save(out, 2)
    assert checkpoint.prepare_run(str(out), str(ckpt)) == ckpt  # a checkpoint folder
    assert checkpoint.prepare_run(str(tmp_path / "new"), str(out)) == ckpt  # a run folder
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint.prepare_run(str(tmp_path / "new"), str(tmp_path))


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    want = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_metrics_keep_the_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "x": s}) for s in range(4)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "x"')  # a line cut short by SIGKILL
    logger = MetricsLogger(str(tmp_path), 4, tensorboard=False, progress_bar=False, keep_upto=2)
    logger.log(3, {"x": 30.0})
    logger.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in got] == [(0, 0), (1, 1), (2, 2), (3, 30.0)]
