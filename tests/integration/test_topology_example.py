"""The custom-topology example script runs end to end (a user-defined reward actor class,
a colocated reference, spread generators, two learner ranks)."""

from __future__ import annotations

import json

import pytest
from conftest import run_example

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_custom_topology_example(tmp_path, no_ray):
    out = tmp_path / "run"
    proc = run_example("custom_topology.py", out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom topology: reward" in proc.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("train/reward/brevity" in r for r in rows[1:])
    assert rows[-1]["weights/version"] == 2
