"""The user's modules in the working directory, with no PYTHONPATH pointing at it: the real
``rlalign-ray`` console script (whose ``sys.path`` does not hold the working directory, as
``python -m`` would) trains two steps with a reward function and a generator class from a
file in the folder it runs in; both import in the driver (the checks before Ray starts) and
in the actors. The same run scores with ``type: math`` inside a reward actor, and with a
reward type of the folder's own (``type: my_rewards:HasDigitType``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_config

pytestmark = pytest.mark.integration

MY_REWARDS = '''
from rlalign_ray.rewards.types import RewardType
from rlalign_ray.rollout.generator import Generator


def contains_answer(completions, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]


class HasDigit:
    name = "has_digit"

    def __call__(self, inputs):
        return [float(any(ch.isdigit() for ch in t)) for t in inputs.completion_texts]


class HasDigitType(RewardType):
    """A reward type of this folder's own (type: my_rewards:HasDigitType)."""

    def build(self, spec, device):
        return HasDigit()


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
                {"type": "my_rewards:HasDigitType", "weight": 0.1},
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
    for key in ("contains_answer", "math", "math_format", "has_digit"):
        assert 0.0 <= rows[-1][f"train/reward/{key}"] <= 1.0, rows[-1]


RECORDS = """
import os

with open({log!r}, "a") as f:
    f.write(__file__ + "\\n")


def contains_answer(completions, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]
"""


@pytest.mark.full
def test_attached_run_ships_its_working_directory(tiny_model, tmp_path):
    """Attached to a `ray start` cluster (RAY_ADDRESS), the run uploads its working directory:
    the reward actor imports the module from Ray's copy of it, not from the driver's
    folder; ``check-config --resources`` reads the cluster's nodes."""
    exe = shutil.which("rlalign-ray")
    if exe is None:
        pytest.skip("the rlalign-ray command is not installed (pip install -e .)")
    run, log = tmp_path / "run", tmp_path / "imported_from.txt"
    run.mkdir()
    (run / "my_rewards.py").write_text(RECORDS.format(log=str(log)))
    cfg = small_config(
        tiny_model,
        str(tmp_path / "out"),
        rollout={"num_actors": 1},
        reward={"num_actors": 1, "rewards": [{"path": "my_rewards:contains_answer"}]},
        algorithm={"name": "grpo", "kl_coef": 0.0},
        trainer={"steps": 1, "output_dir": str(tmp_path / "out"), "progress_bar": False},
        data={"train": str(REPO / "configs/data/arith_train.jsonl"), "eval": None},
    )
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    script, cluster = REPO / "launch/local_cluster.sh", tempfile.mkdtemp(prefix="rlwd", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    up = ["bash", str(script), "start", "--workers", "1", "--temp-dir", cluster]
    assert subprocess.run(up, env=env, capture_output=True, timeout=240).returncode == 0
    try:
        for line in Path(cluster, "cluster.env").read_text().splitlines():
            key, _, value = line.partition("=")
            if key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
                env[key] = value
        env["RAY_AUTH_MODE"] = "token"
        check = subprocess.run(
            [exe, "check-config", "config.yaml", "--resources"],
            cwd=run, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert check.returncode == 0 and "verdict: fits the cluster" in check.stdout, check
        assert check.stdout.count("127.0.0.2 (") == 2, check.stdout  # both nodes
        train = subprocess.run(
            [exe, "train", "config.yaml"], cwd=run, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    finally:
        down = ["bash", str(script), "stop", "--temp-dir", cluster]
        subprocess.run(down, env=env, capture_output=True, timeout=120)
        shutil.rmtree(cluster, ignore_errors=True)
    where = log.read_text().splitlines()
    assert where[0] == str(run / "my_rewards.py")  # the driver's checks: its own folder
    assert any("working_dir_files" in w for w in where[1:]), where  # the reward actor
