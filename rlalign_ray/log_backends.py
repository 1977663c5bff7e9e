"""Logger backends: where each step's metrics (and sampled completions) go.

``trainer.loggers`` picks any of ``jsonl`` (``metrics.jsonl``), ``tensorboard``, ``wandb``,
``mlflow`` and ``console``; ``MetricsLogger`` (``rlalign_ray/run_log.py``) fans every step out
to them. Each backend takes a row ``{"step": s, key: value, ...}`` and, with
``trainer.log_completions``, a list of sample rows (prompt, completion, reward, one column
per reward). wandb and mlflow are optional extras (``pip install 'rlalign-ray[wandb]'``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
    }


class Backend:
    """One destination for metrics; every method may be left as is."""

    def log(self, step: int, row: dict[str, Any]) -> None:
        pass

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlBackend(Backend):
    """``metrics.jsonl``: one JSON line per step (the file ``resume`` truncates)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def log(self, step: int, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardBackend(Backend):
    """Scalars under ``<output_dir>/tensorboard``; completions as a markdown table (text)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, row: dict[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._tb.add_text("completions", markdown_table(samples), step)
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class ConsoleBackend(Backend):
    """A short line per step on the console (through tqdm, so a progress bar stays intact)."""

    KEYS = ("train/reward_mean", "train/kl", "train/loss", "train/lr", "time/step_s")

    def log(self, step: int, row: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        keys = [k for k in row if k in self.KEYS or k.startswith("eval/") and "reward_mean" in k]
        parts = [f"{k}={row[k]:.4g}" for k in keys if isinstance(row[k], (int, float))]
        tqdm.write(f"step {step}: " + " ".join(parts))


class WandbBackend(Backend):
    """A W&B run (``WANDB_MODE=offline`` writes it under ``<output_dir>/wandb`` to sync later).
    The run id is kept in ``<output_dir>/wandb_run_id``, so a resumed run continues it."""

    def __init__(self, out: Path, project: str, name: str, config: dict[str, Any]):
        import secrets

        import wandb

        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self._wandb = wandb
        self.run = wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=str(out), config=config
        )

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=step)

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        if not samples:
            return
        columns = list(samples[0])
        table = self._wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
        self.run.log({"completions": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowBackend(Backend):
    """An MLflow run in ``tracking_uri`` (default ``<output_dir>/mlruns``, MLflow's file store);
    completions go in as JSON artifacts ``completions/step_N.json``. The run id is kept in
    ``<output_dir>/mlflow_run_id``, so a resumed run continues it."""

    def __init__(
        self, out: Path, tracking_uri: str | None, experiment: str, name: str, config: dict
    ):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 asks for this to use its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        id_file = out / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            id_file.write_text(self.run_id)
            self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step: int, row: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in _scalars(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.client.log_dict(self.run_id, samples, f"completions/step_{step}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``; ``pass@k`` becomes ``pass_at_k``."""
    return key.replace("@", "_at_")


def markdown_table(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return ""
    cols = list(samples[0])

    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(s[c]) for c in cols) + " |" for s in samples]
    return "\n".join(lines)
