"""Prompt datasets: JSONL files, Parquet files and ``datasets.save_to_disk`` folders,
validated row by row (errors name ``file:line``, or ``path row N`` for the others)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlalign_ray.data.batch import PromptItem
from rlalign_ray.errors import DataError


def load_prompts(path: str, prompt_key: str = "prompt", limit: int = 0) -> list[PromptItem]:
    """Read a prompt dataset; every key other than ``prompt_key`` becomes a column.

    The format follows the path: a ``.parquet`` file, a folder written by
    ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder with one split, or the
    split's own folder), else JSONL (one JSON object per line). A malformed row is a
    ``DataError`` naming where it is and what is wrong; nothing is silently skipped.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {path!r} does not exist (relative paths start at {Path.cwd()})")
    if p.is_dir():
        rows = _arrow_rows(path, _load_from_disk(path))
    elif p.suffix == ".parquet":
        rows = _arrow_rows(path, _load_parquet(path))
    else:
        rows = _jsonl_rows(path)
    items: list[PromptItem] = []
    columns: set[str] | None = None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
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
        items.append(PromptItem(index=len(items), prompt=prompt, columns=row, source=where))
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"dataset {path!r} has no prompts")
    return items


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Parquet files and save_to_disk folders needs the datasets package: "
            "pip install datasets"
        ) from None
    return datasets


def _load_parquet(path: str) -> Any:
    try:
        return _datasets().Dataset.from_parquet(path, keep_in_memory=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input
        raise DataError(f"dataset {path!r}: cannot read it as Parquet ({type(e).__name__}: {e})")


def _load_from_disk(path: str) -> Any:
    datasets = _datasets()
    p = Path(path)
    if not any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(
            f"dataset {path!r} is a folder but not one written by datasets' save_to_disk "
            "(no state.json / dataset_dict.json); give a .jsonl or .parquet file, or such a folder"
        )
    try:
        ds = datasets.load_from_disk(path, keep_in_memory=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"dataset {path!r}: datasets.load_from_disk failed ({type(e).__name__}: {e})"
        )
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if len(splits) != 1:
            raise DataError(
                f"dataset {path!r} holds the splits {splits}; give one split's folder, "
                f"e.g. {str(p / splits[0])!r}"
            )
        ds = ds[splits[0]]
    return ds


def _arrow_rows(path: str, ds: Any) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{path} row {i + 1}", dict(row)


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
