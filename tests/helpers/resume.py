"""Comparing a resumed run's metrics with those of a run that never stopped."""

from __future__ import annotations

import json

import pytest

KEYS = ("train/reward_mean", "train/loss", "train/kl")


def metric_rows(text: str) -> dict[int, dict]:
    """metrics.jsonl's rows by step; each step logged once."""
    rows = [json.loads(x) for x in text.splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "a step is logged twice"
    return {r["step"]: r for r in rows}


def assert_same(a: dict[int, dict], b: dict[int, dict], steps, every: bool = False) -> None:
    """The policy's loss, reward and KL, the KL coefficient, weight version and lr
    (``every``: all metrics but the timings, and the same keys)."""
    for step in steps:
        keys = [k for k in a[step] if not k.startswith("time/")] if every else KEYS
        if every:
            assert sorted(b[step]) == sorted(a[step]), step
        for key in (*keys, "train/kl_coef", "weights/version", "train/lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
