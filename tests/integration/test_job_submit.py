"""`ray job submit` end to end on a real two-node Ray cluster on loopback (127.0.0.2).

launch/local_cluster.sh starts a head and one worker node (`ray start`, token auth on,
its own temp dir); launch/submit.sh uploads the repository as the job's working dir and
runs `rlalign-ray train configs/demo_cpu.yaml` there for two steps; the job must end
SUCCEEDED with metrics for steps 0..2. Everything started is stopped in `finally`,
through the cluster's own pid/state file (never `ray stop`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rlalign_ray.runtime.cluster import LOOPBACK

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "launch/local_cluster.sh"
SUBMIT = REPO / "launch/submit.sh"


def _state(temp_dir: str) -> dict[str, str]:
    out = {}
    for line in Path(temp_dir, "cluster.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes that belong to this cluster: they carry its token path in their env."""
    marker = f"RAY_AUTH_TOKEN_PATH={temp_dir}/auth_token".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path("/proc", entry, "environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            pids.append(int(entry))
    return pids


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.timeout(600)
def test_submit_demo_to_two_node_local_cluster(tmp_path):
    if shutil.which("ray") is None or shutil.which("rlalign-ray") is None:
        pytest.skip("the ray and rlalign-ray commands are needed")
    t0 = time.monotonic()
    # Short: Ray's unix socket paths live under it (limit ~107 characters).
    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    out_dir = tmp_path / "run"
    cache = os.environ.get("RLALIGN_RAY_CACHE") or str(Path.home() / ".cache/rlalign_ray")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "PYTEST_")) and k != "RLALIGN_RAY_CACHE"
    }
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    submission_id = f"rlalign-test-{uuid.uuid4().hex[:8]}"
    logs = ""
    try:
        r = _run(
            [
                "bash",
                str(LOCAL_CLUSTER),
                "start",
                "--workers",
                "1",
                "--temp-dir",
                temp_dir,
                "--head-cpus",
                "2",
                "--worker-cpus",
                "2",
                "--timeout",
                "120",
            ],
            env,
            150,
        )
        assert r.returncode == 0, f"local_cluster.sh start failed:\n{r.stdout}\n{r.stderr}"
        state = _state(temp_dir)
        assert state["RAY_ADDRESS"].startswith(f"{LOOPBACK}:")  # never the routable address
        assert state["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
        assert Path(state["RAY_AUTH_TOKEN_PATH"]).is_file()
        t_cluster = time.monotonic() - t0

        # Token auth is really on: a client without the token is turned away.
        no_token = dict(env, RAY_AUTH_MODE="disabled")
        r = _run(["ray", "job", "list", "--address", state["RAY_API_SERVER_ADDRESS"]], no_token, 60)
        assert r.returncode != 0 and "auth" in (r.stdout + r.stderr).lower()

        client = dict(
            env,
            RAY_API_SERVER_ADDRESS=state["RAY_API_SERVER_ADDRESS"],
            RAY_AUTH_TOKEN_PATH=state["RAY_AUTH_TOKEN_PATH"],
        )  # RAY_AUTH_MODE: default
        overrides = [
            "trainer.steps=2",
            "trainer.eval_every=1",
            "data.eval_limit=8",
            f"trainer.output_dir={out_dir}",
            "rollout.num_actors=1",
            "reward.num_actors=1",
            "learner.resources.num_cpus=1",
            "rollout.resources.num_cpus=1",
            "reward.resources.num_cpus=0.5",
            "reference.resources.num_cpus=0.5",
            "trainer.progress_bar=false",
        ]
        r = _run(
            [
                "bash",
                str(SUBMIT),
                "--submission-id",
                submission_id,
                "--env",
                f"RLALIGN_RAY_CACHE={cache}",
                "configs/demo_cpu.yaml",
                *overrides,
            ],
            client,
            240,
        )
        logs = r.stdout + r.stderr
        assert r.returncode == 0, f"submit.sh exited {r.returncode}:\n{logs[-6000:]}"
        assert f"job {submission_id} finished with status SUCCEEDED" in r.stdout
        # where the outputs really are, and that a local path must be shared by both nodes
        assert f"outputs: {out_dir} (metrics.jsonl from the driver" in r.stdout, r.stdout
        assert "a local path on a cluster of 2 nodes" in r.stdout, r.stdout

        r = _run(["ray", "job", "status", submission_id], dict(client, RAY_AUTH_MODE="token"), 60)
        assert f"Job '{submission_id}' succeeded" in r.stdout + r.stderr, r.stdout + r.stderr

        rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
        steps = sorted({row["step"] for row in rows})
        assert steps == [0, 1, 2], steps
        train = [row for row in rows if "train/reward_mean" in row]
        assert sorted(row["step"] for row in train) == [1, 2], rows
        assert all(0.0 <= row["train/reward_mean"] <= 1.0 for row in train)
        assert (out_dir / "final").is_dir()

        # The plain Ray command works too (it blocks and exits 0 when the job succeeds).
        plain_dir = tmp_path / "plain"
        runtime_env = {"env_vars": {"RLALIGN_RAY_CACHE": cache}, "excludes": ["runs/"]}
        r = _run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                state["RAY_API_SERVER_ADDRESS"],
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps(runtime_env),
                "--",
                "rlalign-ray",
                "train",
                "configs/demo_cpu.yaml",
                "trainer.steps=2",
                *[
                    o
                    for o in overrides
                    if not o.startswith(("trainer.steps", "trainer.output_dir"))
                ],
                f"trainer.output_dir={plain_dir}",
            ],
            dict(client, RAY_AUTH_MODE="token"),
            240,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        assert "succeeded" in (r.stdout + r.stderr).lower()
        plain = [json.loads(x) for x in (plain_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(row["step"] for row in plain) == 2
        print(f"\ncluster up in {t_cluster:.0f}s; job done at {time.monotonic() - t0:.0f}s")
    finally:
        r = _run(["bash", str(LOCAL_CLUSTER), "stop", "--temp-dir", temp_dir], env, 90)
        left = _cluster_pids(temp_dir)
        if r.returncode == 0 and not left:
            shutil.rmtree(temp_dir, ignore_errors=True)
        print(f"stopped in total {time.monotonic() - t0:.0f}s")
    assert r.returncode == 0, f"local_cluster.sh stop failed:\n{r.stdout}\n{r.stderr}"
    assert not left, f"processes of the test cluster survived stop: {left}"
