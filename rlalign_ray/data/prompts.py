"""Prompt datasets: JSONL files, one object per line, validated line by line."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlalign_ray.data.batch import PromptItem
from rlalign_ray.errors import DataError


def load_prompts(path: str, prompt_key: str = "prompt", limit: int = 0) -> list[PromptItem]:
    """Read a JSONL prompt file. Every key other than ``prompt_key`` becomes a column.

    A malformed line is a ``DataError`` naming ``file:line`` and what is wrong; nothing is
    silently skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset {path!r} does not exist (relative paths start at {Path.cwd()})")
    items: list[PromptItem] = []
    columns: set[str] | None = None
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{where}: each line must be a JSON object, got {type(row).__name__}"
                )
            if prompt_key not in row:
                raise DataError(
                    f"{where}: no {prompt_key!r} key (set data.prompt_key to the key "
                    f"that holds the prompt; keys here: {sorted(row)})"
                )
            prompt = row.pop(prompt_key)
            if not _is_prompt(prompt):
                raise DataError(
                    f"{where}: {prompt_key!r} must be a non-empty string or a list of "
                    "{role, content} messages"
                )
            if columns is None:
                columns = set(row)
            elif set(row) != columns:
                raise DataError(
                    f"{where}: columns {sorted(row)} differ from the first line's "
                    f"{sorted(columns)}; every line needs the same keys"
                )
            items.append(PromptItem(index=len(items), prompt=prompt, columns=row))
            if limit and len(items) >= limit:
                break
    if not items:
        raise DataError(f"dataset {path!r} has no prompts")
    return items


def _is_prompt(x: object) -> bool:
    if isinstance(x, str):
        return bool(x)
    return (
        isinstance(x, list)
        and bool(x)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)
    )


class PromptSampler:
    """Draws prompts for each step: shuffled epochs, seeded, resumable by step."""

    def __init__(self, items: list[PromptItem], seed: int):
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def next(self, n: int) -> list[PromptItem]:
        out: list[PromptItem] = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._perm(self.epoch)
            out.append(self.items[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm(self.epoch)
