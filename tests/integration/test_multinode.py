"""A multi-node cluster on one machine (launch/local_cluster.sh: three `ray start` nodes on
127.0.0.2, token auth on, each with different custom resources): a topology spreads the
generators over two nodes and puts the learner ranks on the third; Ray's own placement
state says where each actor ran. A node that leaves mid-run ends the step naming the roles
it took with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRIPT = REPO / "launch/local_cluster.sh"


@pytest.fixture
def three_nodes():
    """head: learner_slot=2; worker a and b: gen_slot=1 each. Yields the cluster's env file."""
    temp_dir = tempfile.mkdtemp(prefix="rlmn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "start",
            "--workers",
            "2",
            "--temp-dir",
            temp_dir,
            "--head-cpus",
            "2",
            "--worker-cpus",
            "1",
            "--object-store-mb",
            "256",
            "--node-resources",
            'head={"learner_slot": 2}',
            "--node-resources",
            'a={"gen_slot": 1}',
            "--node-resources",
            'b={"gen_slot": 1}',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        yield Path(temp_dir, "cluster.env"), env
    finally:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", "--temp-dir", temp_dir],
            env=env,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(temp_dir, ignore_errors=True)


def _drive(mode, three_nodes, tiny_model, tmp_path) -> dict:
    env_file, env = three_nodes
    state = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    env = {
        **env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["RAY_AUTH_TOKEN_PATH"],
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests/helpers/multinode_driver.py"),
            mode,
            tiny_model,
            str(tmp_path / "run"),
            str(env_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_generators_spread_over_two_nodes_learners_on_the_third(three_nodes, tiny_model, tmp_path):
    out = _drive("spread", three_nodes, tiny_model, tmp_path)
    nodes, where = out["nodes"], out["where"]
    assert "error" not in out, out.get("error")
    assert sorted(where["generator"]) == sorted([nodes["node_a"], nodes["node_b"]])
    assert where["learner"] == [nodes["node_head"], nodes["node_head"]]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["weights/version"] == 2


def test_a_node_that_leaves_ends_the_step_naming_the_lost_roles(three_nodes, tiny_model, tmp_path):
    msg = _drive("node_loss", three_nodes, tiny_model, tmp_path)["error"]
    assert "generator pool" in msg and "an actor died" in msg
    assert "Roles that lost actors: generator (1 of 2 actors)" in msg
    assert "Nodes no longer alive" in msg
