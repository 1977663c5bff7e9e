"""Run outputs on a cluster (``rlalign_ray/storage.py``), on two nodes of a cluster on this
machine that share no file in one folder, as two machines would not: launch/local_cluster.sh
``--isolate`` starts the worker node in a mount namespace of its own with an empty tmpfs over
that folder (``Cluster.apart``), which holds the run's config, a local output_dir and every
node's staging folder.

- a local output_dir that the worker node, where the learner ranks run, does not see is
  refused at start-up (exit 2), naming that node and the fix, before any training;
- with output_dir an S3 URI (moto's server on 127.0.0.1) and both learner ranks (ZeRO-2) on
  the worker node, a run killed with SIGKILL after step 3 resumes from the bucket
  (``trainer.resume=auto``): it logs step 3 exactly as the killed run did, the bucket keeps
  each step's row once, and its final/ folder loads with ``from_pretrained``;
- (full tier, one node) PPO's critic ranks write and read their shards through the bucket
  too, and the resumed run's step 3 is the straight run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_config
from helpers.resume import assert_same, metric_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("s3fs")
from helpers.s3 import BUCKET, CREDENTIALS, have_moto_server, s3_server  # noqa: E402

if not have_moto_server():
    pytest.skip("moto[server] is not installed", allow_module_level=True)

SCRIPT = REPO / "launch/local_cluster.sh"


@dataclass
class Cluster:
    apart: Path  # the folder the worker node does not share with the head
    env: dict[str, str]  # a client's environment (address, token, credentials)
    nodes: dict[str, str]  # node_head / node_a -> node id


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (3 CPUs) and worker node a (1 CPU, ``--isolate`` over ``apart``). The nodes
    carry the S3 credentials and PYTHONPATH in their environment, as a cloud node's role
    and image would; every actor inherits them."""
    apart = tmp_path_factory.mktemp("apart")
    temp_dir = tempfile.mkdtemp(prefix="rlst", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(CREDENTIALS, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    args = ["--workers", "1", "--temp-dir", temp_dir, "--head-cpus", "3", "--worker-cpus", "1"]
    args += ["--object-store-mb", "256", "--isolate", str(apart)]
    start = subprocess.run(
        ["bash", str(SCRIPT), "start", *args], env=env, capture_output=True, text=True, timeout=240
    )
    try:
        if "--isolate: cannot mount" in start.stderr:
            pytest.skip(start.stderr.strip())
        assert start.returncode == 0, start.stderr[-2000:]
        state = dict(
            line.split("=", 1)
            for line in Path(temp_dir, "cluster.env").read_text().splitlines()
            if "=" in line and not line.startswith("#")
        )
        env.update(
            RAY_ADDRESS=state["RAY_ADDRESS"],
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=state["RAY_AUTH_TOKEN_PATH"],
        )
        yield Cluster(apart, env, _node_ids(env))
    finally:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", "--temp-dir", temp_dir],
            env=env,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_ids(env: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, ray; ray.init(logging_level='ERROR'); print(json.dumps({k: n['NodeID'] "
        "for n in ray.nodes() if n['Alive'] for k in n['Resources'] if k in "
        "('node_head', 'node_a')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _config(model: str, apart: Path, output_dir: str, **trainer) -> Path:
    """test_resume.py's run with both learner ranks (ZeRO-2, each its own optimizer shard)
    on worker node a, everything else on the head."""
    head = {"num_cpus": 0.5, "custom": {"node_head": 0.01}}
    cfg = small_config(
        model,
        output_dir,
        data={"eval": None},
        algorithm={"name": "grpo", "kl_coef": 0.01, "kl_target": 0.05, "kl_horizon": 100},
        rollout={"resources": head},
        reward={"resources": head},
        reference={"resources": head},
        learner={
            "world_size": 2,
            "zero_stage": 2,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "lr_warmup_steps": 4,
            "resources": {"num_cpus": 0.5, "custom": {"node_a": 0.01}},
        },
        trainer={
            "steps": 4,
            "save_every": 2,
            "eval_every": 0,
            "output_dir": output_dir,
            "tensorboard": False,
            "progress_bar": False,
            "staging_dir": str(apart / "staging"),  # each node its own
            **trainer,
        },
        run={"placement_timeout_s": 120, "call_timeout_s": 600},
    )
    path = apart / f"{Path(output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cluster: Cluster, config: Path, *overrides: str) -> subprocess.Popen:
    """``rlalign-ray train`` attached to the cluster (RAY_ADDRESS), in a session of its own."""
    cmd = [sys.executable, "-m", "rlalign_ray.cli", "train", str(config), *overrides]
    log = config.parent / f"{config.stem}.{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        cmd,
        cwd=config.parent,
        env=cluster.env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115
    )
    proc.log = log  # its stderr
    return proc


def test_a_local_output_dir_the_worker_node_does_not_see_is_refused(cluster, tiny_model):
    out = cluster.apart / "local-run"
    config = _config(tiny_model, cluster.apart, str(out))
    t0 = time.monotonic()
    proc = _train(cluster, config)
    assert proc.wait(600) == 2
    msg = proc.log.read_text()
    print(f"refused after {time.monotonic() - t0:.0f}s")
    assert "rlalign-ray: error: trainer.output_dir" in msg and "Traceback" not in msg, msg
    worker, head = cluster.nodes["node_a"], cluster.nodes["node_head"]
    assert f"node 127.0.0.2 (node id {worker[:12]}): learner rank 0, learner rank 1: " in msg
    assert f"(node 127.0.0.2, node id {head[:12]}):" in msg  # the driver's, not failing
    assert "shared volume" in msg and "trainer.output_dir=s3://" in msg
    assert not out.exists()  # a new run that never trained leaves nothing


def test_two_node_run_on_s3_killed_and_resumed_from_the_bucket(cluster, endpoint, tiny_model):
    import s3fs

    run = f"s3://{BUCKET}/run"
    # 6 steps: the kill lands after step 3 is seen, and on a fast machine step 4 (and its
    # checkpoint) may land first, as in test_resume.py
    config = _config(
        tiny_model,
        cluster.apart,
        run,
        storage_options={"endpoint_url": endpoint},
        log_sync_s=0,
        steps=6,
    )
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    prefix = f"{BUCKET}/run"

    def read(rel: str) -> str:
        fs.invalidate_cache()
        return fs.cat_file(f"{prefix}/{rel}").decode() if fs.exists(f"{prefix}/{rel}") else ""

    t0 = time.monotonic()
    proc = _train(cluster, config)
    try:
        deadline = time.monotonic() + 600
        while '"step": 3' not in read("metrics.jsonl"):
            assert proc.poll() is None, f"training exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "step 3 never reached the bucket"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    t_killed = time.monotonic() - t0
    killed = metric_rows(read("metrics.jsonl"))
    assert sorted(killed)[:3] == [1, 2, 3] and max(killed) < 6
    latest = read("checkpoints/latest").strip()
    assert latest in ("step_2", "step_4")
    saved = int(latest.removeprefix("step_"))
    ds = {Path(p).name for p in fs.find(f"{prefix}/checkpoints/{latest}/learner")}
    # each learner rank uploaded its own files from the worker node
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"} <= ds
    assert {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt"} <= ds
    assert "mp_rank_00_model_states.pt" in ds

    _wait_ok(_train(cluster, config, "trainer.resume=auto"))
    rows = metric_rows(read("metrics.jsonl"))
    # the killed run's rows after its checkpoint were dropped, then redone
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert all(rows[s] == killed[s] for s in range(1, saved + 1))
    redone = [s for s in killed if s > saved]
    assert redone  # the steps after the checkpoint, as the killed run had them
    assert_same(killed, rows, redone)
    listed = fs.ls(f"{prefix}/checkpoints", detail=False)
    assert {f"{prefix}/checkpoints/{name}" for name in ("latest", "step_6")} <= set(listed)
    assert not list((cluster.apart / "staging").glob("*-driver"))  # the driver's copy is gone
    _loads(fs, f"{prefix}/final", cluster.apart / "final")
    print(f"killed run {t_killed:.0f}s, whole test {time.monotonic() - t0:.0f}s")


def _wait_ok(proc: subprocess.Popen, timeout_s: float = 600) -> None:
    try:
        assert proc.wait(timeout_s) == 0, f"training exited with {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _loads(fs, remote: str, local: Path) -> None:
    """The final policy, downloaded from the bucket, loads with from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fs.invalidate_cache()
    fs.get(remote + "/", str(local) + "/", recursive=True)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert AutoTokenizer.from_pretrained(local)("1+1=").input_ids


@pytest.mark.full
def test_ppo_learner_and_critic_shards_resume_from_a_bucket(
    ray_local, endpoint, tiny_model, tmp_path
):
    from helpers.s3 import options

    from rlalign_ray.config import config_from_dict
    from rlalign_ray.storage import Storage, join
    from rlalign_ray.trainers import Trainer

    ranks = {"world_size": 2, "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-3}
    ranks["resources"] = {"num_cpus": 0.5}

    def config(run: str, steps: int, **trainer):
        return config_from_dict(
            small_config(
                tiny_model,
                run,
                data={"eval": None},
                algorithm={"name": "ppo", "kl_coef": 0.05, "kl_in_reward": True, "lam": 0.95},
                rollout={"n_samples": 1, "prompts_per_step": 4, "num_actors": 1},
                reward={"num_actors": 1},
                learner=ranks,
                critic=ranks,
                trainer={
                    "steps": steps,
                    "save_every": 2,
                    "storage_options": options(endpoint),  # the embedded Ray has no env
                    "staging_dir": str(tmp_path / "staging"),
                    "log_sync_s": 0,
                    **trainer,
                },
                run={"call_timeout_s": 900},
            )
        )

    straight, resumed = f"s3://{BUCKET}/ppo-straight", f"s3://{BUCKET}/ppo-resumed"
    Trainer(config(straight, 3)).fit()
    Trainer(config(resumed, 2)).fit()
    storage = Storage(options(endpoint))
    critic = storage.listdir(join(resumed, "checkpoints", "step_2", "critic", "ds"))
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in critic
    Trainer(config(resumed, 3, resume="auto")).fit()
    a = metric_rows(storage.read_text(join(straight, "metrics.jsonl")))
    b = metric_rows(storage.read_text(join(resumed, "metrics.jsonl")))
    assert sorted(b) == [1, 2, 3]
    assert_same(a, b, [3])
    assert b[3]["critic/value_loss"] == pytest.approx(a[3]["critic/value_loss"], rel=1e-6)
