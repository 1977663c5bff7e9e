"""Run output a person can read: metrics.jsonl, TensorBoard, and a progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

BAR_KEYS = {
    "train/reward_mean": "reward",
    "eval/reward_mean": "eval",
    "train/kl": "kl",
    "time/step_s": "s/step",
}


class MetricsLogger:
    """One JSON line per step in ``<output_dir>/metrics.jsonl``; TensorBoard beside it."""

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        tensorboard: bool = True,
        progress_bar: bool = True,
        keep_upto: int | None = None,
    ):
        """``keep_upto``: keep only the rows of steps up to it already in the file (a resumed
        run: the steps after its checkpoint are logged again; -1: none); None: append."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if keep_upto is not None:
            truncate(self.path, keep_upto)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        self._bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="rlalign-ray", unit="step", dynamic_ncols=True)
        self._shown: dict[str, str] = {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._bar is not None:
            for k, short in BAR_KEYS.items():
                if k in row:
                    self._shown[short] = f"{row[k]:.3f}"
            self._bar.set_postfix(self._shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def rewind(self, step: int) -> None:
        """Keep the rows up to ``step`` (training continues from its checkpoint)."""
        self._file.close()
        truncate(self.path, step)
        self._file = self.path.open("a", encoding="utf-8")
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


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
