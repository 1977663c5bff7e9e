"""A run's files in a URI (``rlalign_ray/storage.py``, ``checkpoint.py``) against a real S3 API
(moto's server on 127.0.0.1): checkpoint folders without atomic rename, the driver's logs
uploaded and truncated on resume, each rank's own shard files, and the config's checks."""

from __future__ import annotations

import json

import pytest

from rlalign_ray import checkpoint
from rlalign_ray.config import load_config
from rlalign_ray.errors import ConfigError
from rlalign_ray.run_log import MetricsLogger
from rlalign_ray.storage import RunLogs, Storage, join

pytest.importorskip("s3fs")
from helpers.s3 import BUCKET, have_moto_server, options, s3_server  # noqa: E402

if not have_moto_server():
    pytest.skip("moto[server] is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def endpoint():
    with s3_server() as url:
        yield url


@pytest.fixture
def store(endpoint, tmp_path, request):
    run = f"s3://{BUCKET}/{request.node.name}"
    return Storage(options(endpoint), str(tmp_path / "staging")), run


def _save(storage: Storage, run: str, step: int, keep: int = 2) -> str:
    folder = checkpoint.begin(run, step, storage)
    with storage.writing(join(folder, "learner"), "learner0") as local:
        (local / "ds").mkdir()
        (local / "ds" / "mp_rank_00_model_states.pt").write_text("shared")
        (local / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("rank 0")
        (local / "ds" / "rng_rank0.pt").write_text("rng 0")
    with storage.writing(join(folder, "learner"), "learner1") as local:
        (local / "ds").mkdir()
        (local / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("rank 1")
        (local / "ds" / "rng_rank1.pt").write_text("rng 1")
    checkpoint.TrainerState(step, step, {"pos": step}, 0.1).write(folder, storage)
    return checkpoint.commit(folder, step, keep, storage)


def test_checkpoints_in_a_bucket_are_complete_once_trainer_state_is_there(store):
    storage, run = store
    root = checkpoint.checkpoints_dir(run)
    for step in (2, 4, 6):
        _save(storage, run, step)
    assert storage.listdir(root) == ["latest", "step_4", "step_6"]  # keep_checkpoints=2
    assert checkpoint.latest(root, storage) == join(root, "step_6")
    # a save cut short (no trainer_state.json) is not a checkpoint and goes at the next start
    storage.write_text(join(root, "step_8", "learner", "ds", "rng_rank0.pt"), "half")
    assert checkpoint.complete(root, storage) == [join(root, "step_4"), join(root, "step_6")]
    assert checkpoint.prepare_run(run, "auto", storage) == join(root, "step_6")
    assert storage.listdir(root) == ["latest", "step_4", "step_6"]
    with pytest.raises(ConfigError, match="already holds a run"):
        checkpoint.prepare_run(run, "none", storage)
    other = f"s3://{BUCKET}/elsewhere"
    assert checkpoint.prepare_run(other, join(root, "step_4"), storage) == join(root, "step_4")
    assert checkpoint.prepare_run(other, run, storage) == join(root, "step_6")  # a run's latest
    # a rank downloads the shared files and its own shard only
    keep = lambda rel: not checkpoint.other_ranks_file(rel, 1)  # noqa: E731
    with storage.reading(join(root, "step_6", "learner"), "learner1", keep) as local:
        got = sorted(str(p.relative_to(local)) for p in local.rglob("*.pt"))
    assert got == [
        "ds/mp_rank_00_model_states.pt",
        "ds/rng_rank1.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert not local.exists()  # the staging copy is gone


def test_logs_are_uploaded_when_changed_and_truncated_on_resume(store):
    storage, run = store
    logs = RunLogs(storage, run)
    logger = MetricsLogger(str(logs.folder), 4, tensorboard=False, progress_bar=False)
    for step in (1, 2, 3):
        logger.log(step, {"x": float(step)})
    logs.push()
    logger.close()
    storage.write_text(join(run, "checkpoints", "latest"), "step_2\n")  # never a log
    logs.close()
    assert not logs.folder.exists()
    # resumed from step 2: the rows after it go, in the bucket too once pushed
    resumed = RunLogs(storage, run)
    resumed.pull()
    assert sorted(p.name for p in resumed.folder.iterdir()) == ["metrics.jsonl"]
    logger = MetricsLogger(
        str(resumed.folder), 4, tensorboard=False, progress_bar=False, keep_upto=2
    )
    logger.log(3, {"x": 30.0})
    logger.close()
    resumed.push()
    rows = [json.loads(x) for x in storage.read_text(join(run, "metrics.jsonl")).splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    resumed.push(every_s=3600.0)  # nothing changed, and not due: nothing sent
    resumed.close()
    # a fresh start over it (no checkpoint) drops the old rows and the old W&B run id
    storage.write_text(join(run, "wandb_run_id"), "old")
    fresh = RunLogs(storage, run)
    fresh.pull()
    MetricsLogger(str(fresh.folder), 4, tensorboard=False, progress_bar=False, keep_upto=-1).close()
    fresh.push()
    assert storage.listdir(run) == ["checkpoints", "metrics.jsonl"]
    assert storage.read_text(join(run, "metrics.jsonl")) == ""
    fresh.close()


def test_a_uri_needs_its_filesystem_installed():
    cfg = load_config("configs/demo_cpu.yaml", ["trainer.output_dir=s3://b/run"])
    assert cfg.trainer.output_dir == "s3://b/run"
    with pytest.raises(ConfigError, match="fsspec knows no nofs:// filesystem"):
        load_config("configs/demo_cpu.yaml", ["trainer.output_dir=nofs://b/run"])
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'rlalign-ray\[gcs\]'"):
            load_config("configs/demo_cpu.yaml", ["trainer.resume=gs://b/run"])
