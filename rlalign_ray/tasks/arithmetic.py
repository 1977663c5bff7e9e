"""Deterministic ``a+b=`` arithmetic problems with a verifiable answer.

Every problem is a dict ``{"prompt": "23+45=", "answer": "68"}``; the answer
string is what :func:`rlalign_ray.rewards.builtin.arithmetic_exact` compares
against.  Everything here is a pure function of its arguments (seeded
``random.Random``), so the committed files under ``configs/data/`` can be
regenerated bit-for-bit with :func:`write_datasets`.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterable

# Operand range of the default demo task (inclusive on both ends).
DEFAULT_LO = 0
DEFAULT_HI = 99
DEFAULT_SEED = 1234
DEFAULT_N_TRAIN = 2000
DEFAULT_N_EVAL = 128

TRAIN_FILE = "arith_train.jsonl"
EVAL_FILE = "arith_eval.jsonl"


def format_problem(a: int, b: int) -> dict:
    """Return the problem dict for ``a + b``.

    >>> format_problem(23, 45)
    {'prompt': '23+45=', 'answer': '68'}
    """
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def _all_pairs(lo: int, hi: int) -> list[tuple[int, int]]:
    if hi < lo:
        raise ValueError(f"empty operand range [{lo}, {hi}]")
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def make_problems(
    n: int,
    seed: int = DEFAULT_SEED,
    lo: int = DEFAULT_LO,
    hi: int = DEFAULT_HI,
    exclude: Iterable[str] | None = None,
) -> list[dict]:
    """``n`` distinct ``a+b=`` problems with operands in ``[lo, hi]``, seeded.

    Problems whose prompt is in ``exclude`` are never returned.  Raises
    ``ValueError`` if fewer than ``n`` distinct problems are available.

    >>> make_problems(2, seed=0, lo=0, hi=9) == make_problems(2, seed=0, lo=0, hi=9)
    True
    >>> make_problems(1, seed=0, lo=1, hi=1)
    [{'prompt': '1+1=', 'answer': '2'}]
    """
    excluded = set(exclude or ())
    pairs = [p for p in _all_pairs(lo, hi) if f"{p[0]}+{p[1]}=" not in excluded]
    if n > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems in [{lo}, {hi}], asked for {n}")
    rng = random.Random(seed)
    chosen = rng.sample(pairs, n)
    return [format_problem(a, b) for a, b in chosen]


def train_eval_split(
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = DEFAULT_SEED,
    lo: int = DEFAULT_LO,
    hi: int = DEFAULT_HI,
) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, eval) problem lists: eval uses held-out ``(a, b)`` pairs.

    The eval pairs are drawn first from a seeded shuffle of all pairs, the
    train pairs from the remainder, so no eval prompt ever appears in train.
    """
    pairs = _all_pairs(lo, hi)
    if n_train + n_eval > len(pairs):
        raise ValueError(
            f"only {len(pairs)} distinct problems in [{lo}, {hi}], asked for {n_train}+{n_eval}"
        )
    rng = random.Random(seed)
    rng.shuffle(pairs)
    eval_pairs = pairs[:n_eval]
    train_pairs = pairs[n_eval : n_eval + n_train]
    return [format_problem(*p) for p in train_pairs], [format_problem(*p) for p in eval_pairs]


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_datasets(
    dir: str,
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = DEFAULT_SEED,
    lo: int = DEFAULT_LO,
    hi: int = DEFAULT_HI,
) -> dict[str, str]:
    """Write ``arith_train.jsonl`` and ``arith_eval.jsonl`` into ``dir``.

    Returns ``{"train": path, "eval": path}``.  With the defaults this
    reproduces ``configs/data/arith_{train,eval}.jsonl`` exactly.
    """
    os.makedirs(dir, exist_ok=True)
    train, evals = train_eval_split(n_train, n_eval, seed, lo, hi)
    paths = {"train": os.path.join(dir, TRAIN_FILE), "eval": os.path.join(dir, EVAL_FILE)}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evals)
    return paths


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(write_datasets(sys.argv[1] if len(sys.argv) > 1 else "configs/data"))
