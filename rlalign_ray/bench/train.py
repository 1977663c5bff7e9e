"""bench train (being written)."""

from __future__ import annotations


def add_arguments(p) -> None:
    pass


def run(args) -> dict:
    raise SystemExit("bench train: not written yet")
