"""The custom-loop example runs end to end on the pool API: a generator pool, two reward
pools of different classes on different placements, the learner group, 2 steps."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import run_example

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_custom_loop_example(tmp_path, no_ray):
    out = tmp_path / "run"
    proc = run_example("custom_loop.py", out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom loop: 2 steps" in proc.stdout
    # each pool's class and the placement groups its actors run in, as Ray reports them
    pools = {
        name: (cls, groups)
        for name, cls, groups in re.findall(
            r"^pool (\w+): (\w+), placement groups (\S+)$", proc.stdout, re.M
        )
    }
    assert pools["reward"][0] == "RewardScorer"
    assert pools["judge"][0] == "LengthJudge"
    assert pools["reward"][1] != pools["judge"][1]  # different placements
    assert pools["judge"][1] == pools["learner"][1]  # the judge shares the learner's group

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/correct"] <= 1.0
        assert 0.0 <= r["reward/brevity"] <= 1.0
        assert r["reward/total"] == pytest.approx(r["reward/correct"] + 0.1 * r["reward/brevity"])
        assert math.isfinite(r["train/loss"])
    assert rows[-1]["weights/version"] == 2
