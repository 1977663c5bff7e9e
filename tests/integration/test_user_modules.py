"""The user's modules in the working directory, with no PYTHONPATH pointing at it: the real
``rlalign-ray`` console script (whose ``sys.path`` does not hold the working directory, as
``python -m`` would) trains two steps with a reward function and a generator class from a
file in the folder it runs in; both import in the driver (the checks before Ray starts) and
in the actors. The same run scores with ``type: math`` inside a reward actor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
import yaml
from conftest import REPO, small_config

pytestmark = pytest.mark.integration

MY_REWARDS = '''
from rlalign_ray.rollout.generator import Generator


def contains_answer(completions, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]


class MyGenerator(Generator):
    """The built-in generator, from this folder: the actors must import this module."""
'''


def test_cli_run_imports_modules_from_its_working_directory(tiny_model, tmp_path):
    exe = shutil.which("rlalign-ray")
    if exe is None:
        pytest.skip("the rlalign-ray command is not installed (pip install -e .)")
    pytest.importorskip("math_verify")
    run = tmp_path / "run"
    run.mkdir()
    (run / "my_rewards.py").write_text(MY_REWARDS)
    cfg = small_config(
        tiny_model,
        str(run / "out"),
        rollout={"num_actors": 1, "actor_class": "my_rewards:MyGenerator"},
        reward={
            "num_actors": 1,
            "rewards": [
                {"type": "function", "path": "my_rewards:contains_answer"},
                {"type": "math", "weight": 0.5, "format_weight": 0.1},
            ],
        },
        algorithm={"name": "grpo", "kl_coef": 0.0},
        data={"train": str(REPO / "configs/data/arith_train.jsonl"), "eval": None},
    )
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}  # not the run folder
    proc = subprocess.Popen(
        [exe, "train", "config.yaml"],
        cwd=run,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after 600 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    rows = [json.loads(x) for x in (run / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("contains_answer", "math", "math_format"):
        assert 0.0 <= rows[-1][f"train/reward/{key}"] <= 1.0, rows[-1]
