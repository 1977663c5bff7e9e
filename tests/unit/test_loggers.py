"""Logger backends (trainer.loggers) in-process: files each one writes, completions, resume."""

import importlib.util
import json

import pytest

from rlalign_ray.config import load_config
from rlalign_ray.errors import ConfigError
from rlalign_ray.run_log import MetricsLogger

SAMPLES = [
    {"prompt": "1+2=", "completion": "3", "reward": 1.0, "reward/exact": 1.0, "response_len": 2},
    {"prompt": "2+2=", "completion": "5|x", "reward": 0.0, "reward/exact": 0.0, "response_len": 3},
]


def _run(tmp_path, loggers, keep_upto=-1, steps=(1, 2)):
    logger = MetricsLogger(
        str(tmp_path),
        3,
        progress_bar=False,
        keep_upto=keep_upto,
        loggers=loggers,
        run_config={"trainer": {"steps": 3}},
    )
    for s in steps:
        logger.log(s, {"train/reward_mean": 0.5 * s, "eval/pass@2": 0.25, "train/lr": 1e-3})
        logger.log_completions(s, SAMPLES)
    logger.close()


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_tensorboard_console_and_completions(tmp_path, capsys):
    _run(tmp_path, ["jsonl", "tensorboard", "console"])
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]
    done = _rows(tmp_path / "completions.jsonl")
    assert [(r["step"], r["completion"], r["reward/exact"]) for r in done] == [
        (1, "3", 1.0),
        (1, "5|x", 0.0),
        (2, "3", 1.0),
        (2, "5|x", 0.0),
    ]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 2: train/reward_mean=1" in capsys.readouterr().out
    # a resumed run (checkpoint after step 1) keeps step 1's completions only, then appends
    _run(tmp_path, ["jsonl"], keep_upto=1, steps=(2,))
    assert [r["step"] for r in _rows(tmp_path / "completions.jsonl")] == [1, 1, 2, 2]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_without_jsonl_no_metrics_file(tmp_path):
    _run(tmp_path, ["console"])
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "completions.jsonl").exists()  # completions always go to their file


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="pip install wandb")
@pytest.mark.xfail(
    reason="failed once in a full clean-clone run (a resumed run folder with another id), passes alone and after the ecosystem test; kept visible until understood",
    strict=False,
)
def test_wandb_offline_writes_a_run_and_resumes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, ["wandb"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    _run(tmp_path, ["wandb"], keep_upto=1, steps=(2,))  # resumed: the same run id
    names = sorted(r.name for r in (tmp_path / "wandb").glob("offline-run-*"))
    assert all(n.endswith(run_id) for n in names), (run_id, names)
    _run(tmp_path, ["wandb"], keep_upto=-1, steps=(1,))  # a fresh start: a new run
    assert (tmp_path / "wandb_run_id").read_text() != run_id


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="pip install mlflow")
def test_mlflow_file_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _run(tmp_path, ["mlflow"])
    run_id = (tmp_path / "mlflow_run_id").read_text()
    (run,) = list((tmp_path / "mlruns").glob(f"*/{run_id}"))
    lines = (run / "metrics" / "train" / "reward_mean").read_text().split()
    assert lines[1::3] == ["0.5", "1.0"] and lines[2::3] == ["1", "2"]  # value, step
    assert (run / "metrics" / "eval" / "pass_at_2").exists()
    got = json.loads((run / "artifacts" / "completions" / "step_2.json").read_text())
    assert got == SAMPLES
    assert json.loads((run / "artifacts" / "config.json").read_text())["trainer"]["steps"] == 3


def test_loggers_config(tmp_path):
    cfg = load_config(
        "configs/demo_cpu.yaml", ["trainer.loggers=[jsonl,console]", "trainer.log_completions=4"]
    )
    assert cfg.trainer.loggers == ["jsonl", "console"] and cfg.trainer.log_completions == 4
    with pytest.raises(ConfigError, match="unknown logger 'neptune'"):
        load_config("configs/demo_cpu.yaml", ["trainer.loggers=[jsonl,neptune]"])


def test_missing_logger_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"wandb is not installed; pip install 'rlalign-ray\[wandb\]'"
    ):
        load_config("configs/demo_cpu.yaml", ["trainer.loggers=[wandb]"])
