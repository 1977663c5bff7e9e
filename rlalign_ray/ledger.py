"""The exactly-once ledger of trained samples (``trainer.sample_log: true``).

``<output_dir>/samples.jsonl`` gets one JSON line per trained sample once its step's update
is done: ``step``, ``prompt_index`` (the prompt's index in the train dataset),
``sample_index`` (0 .. n_samples - 1 within the prompt's group), ``version`` (the weight
version that sampled it) and ``generator`` (the index of the generator actor). A step
appears with exactly ``prompts_per_step * n_samples`` lines, each (step, prompt_index,
sample_index) once, also when actors died and their work was re-issued. A resumed run
keeps the lines up to its checkpoint's step, like ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rlalign_ray.run_log import truncate

FILE = "samples.jsonl"


class SampleLog:
    def __init__(self, output_dir: str | Path, keep_upto: int):
        """``keep_upto``: keep the lines of steps up to it (-1: none, a new run)."""
        self.path = Path(output_dir) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate(self.path, keep_upto)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, samples: Sequence[dict[str, int]]) -> None:
        self._file.write("".join(json.dumps({"step": step, **s}) + "\n" for s in samples))
        self._file.flush()

    def rewind(self, step: int) -> None:
        """Keep the lines up to ``step`` (the learner group restarted from its checkpoint)."""
        self._file.close()
        truncate(self.path, step)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


def read(output_dir: str | Path) -> list[dict[str, int]]:
    """Every line of a run's ledger."""
    path = Path(output_dir) / FILE
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
