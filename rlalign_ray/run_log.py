"""Run output a person can read: metrics.jsonl, TensorBoard (and wandb, mlflow, the console),
completions.jsonl, and a progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlalign_ray.storage import basename, is_remote

BAR_KEYS = {
    "train/reward_mean": "reward",
    "eval/reward_mean": "eval",
    "train/kl": "kl",
    "time/step_s": "s/step",
}


class MetricsLogger:
    """Each step's metrics to the ``trainer.loggers`` backends (``rlalign_ray/log_backends.py``):
    ``metrics.jsonl`` and TensorBoard by default; sampled completions to
    ``completions.jsonl``; and a progress bar."""

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        tensorboard: bool = True,
        progress_bar: bool = True,
        keep_upto: int | None = None,
        loggers: list[str] | None = None,
        project: str = "rlalign-ray",
        run_name: str | None = None,
        mlflow_tracking_uri: str | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        """``keep_upto``: keep only the rows of steps up to it already in ``metrics.jsonl``
        and ``completions.jsonl`` (a resumed run: the steps after its checkpoint are logged
        again; -1: none); None: append. ``loggers``: backend names (None: jsonl, plus
        tensorboard when ``tensorboard``)."""
        from rlalign_ray import log_backends as lg

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.completions_path = self.dir / "completions.jsonl"
        if keep_upto is not None:
            truncate(self.path, keep_upto)
            truncate(self.completions_path, keep_upto)
            if keep_upto < 0:  # a new run: not the old run's W&B / MLflow run either
                for f in ("wandb_run_id", "mlflow_run_id"):
                    (self.dir / f).unlink(missing_ok=True)
        names = list(loggers) if loggers is not None else ["jsonl", "tensorboard"]
        if not tensorboard and "tensorboard" in names:
            names.remove("tensorboard")
        name = run_name or self.dir.resolve().name
        config = run_config or {}
        make = {
            "jsonl": lambda: lg.JsonlBackend(self.path),
            "tensorboard": lambda: lg.TensorBoardBackend(self.dir / "tensorboard"),
            "console": lambda: lg.ConsoleBackend(),
            "wandb": lambda: lg.WandbBackend(self.dir, project, name, config),
            "mlflow": lambda: lg.MlflowBackend(
                self.dir, mlflow_tracking_uri, project, name, config
            ),
        }
        self.backends: list[lg.Backend] = []
        self._completions = None
        self._bar = None
        try:
            for n in dict.fromkeys(names):  # each once, in order
                self.backends.append(make[n]())
        except Exception:
            self.close()
            raise
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="rlalign-ray", unit="step", dynamic_ncols=True)
        self._shown: dict[str, str] = {}

    @classmethod
    def from_config(
        cls, cfg: Any, keep_upto: int | None, folder: str | Path | None = None
    ) -> MetricsLogger:
        """``folder``: where the files go (default ``trainer.output_dir``; for a URI output_dir
        the driver's staging folder, ``storage.RunLogs``)."""
        t = cfg.trainer
        run_name = t.run_name or (basename(t.output_dir) if is_remote(t.output_dir) else None)
        return cls(
            str(folder or t.output_dir),
            t.steps,
            t.tensorboard,
            t.progress_bar,
            keep_upto=keep_upto,
            loggers=t.loggers,
            project=t.project,
            run_name=run_name,
            mlflow_tracking_uri=t.mlflow_tracking_uri,
            run_config=cfg.to_dict(),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        for b in self.backends:
            b.log(step, row)
        if self._bar is not None:
            for k, short in BAR_KEYS.items():
                if k in row:
                    self._shown[short] = f"{row[k]:.3f}"
            self._bar.set_postfix(self._shown, refresh=False)

    def log_completions(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Sample rows (prompt, completion, rewards) to ``completions.jsonl`` (one line each,
        with its step) and to the backends that show tables."""
        if not samples:
            return
        if self._completions is None:
            self._completions = self.completions_path.open("a", encoding="utf-8")
        for s in samples:
            self._completions.write(json.dumps({"step": step, **s}) + "\n")
        self._completions.flush()
        for b in self.backends:
            b.log_completions(step, samples)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def rewind(self, step: int) -> None:
        """Keep the rows up to ``step`` (training continues from its checkpoint)."""
        from rlalign_ray.log_backends import JsonlBackend

        for b in self.backends:
            if isinstance(b, JsonlBackend):
                b.close()
                truncate(self.path, step)
                b._file = self.path.open("a", encoding="utf-8")
        if self._completions is not None:
            self._completions.close()
            self._completions = None
        truncate(self.completions_path, step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
        if self._completions is not None:
            self._completions.close()
            self._completions = None
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
            self._bar = None


def truncate(path: Path, last_step: int) -> None:
    """Keep the rows of ``path`` with ``step <= last_step`` (rewritten atomically); a row
    cut short by a killed run goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", last_step + 1) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v
