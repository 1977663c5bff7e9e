"""bench weights (being written)."""

from __future__ import annotations


def add_arguments(p) -> None:
    pass


def run(args) -> dict:
    raise SystemExit("bench weights: not written yet")
