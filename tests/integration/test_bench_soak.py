"""``bench soak``: the real Trainer for a few steps, every actor's RSS, the driver's and the
object store's sampled after each step; the JSON carries the series and the summary. The
growth target is not checked here (three steps say nothing about leaks)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import small_config

from rlalign_ray.bench.soak import object_store_used, window_growth
from rlalign_ray.cli import main

pytestmark = pytest.mark.integration


def test_bench_soak_samples_every_actor_each_step(ray_local, tiny_model, tmp_path):
    cfg = small_config(tiny_model, str(tmp_path / "unused"))
    config = tmp_path / "soak.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "soak.json"
    argv = ["bench", "soak", str(config), "--steps", "3", "--window", "2", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [s["step"] for s in result["samples"]] == [1, 2, 3]
    roles = {a["role"] for a in result["actors"]}
    assert roles == {"generator", "reward", "reference", "learner"}
    for s in result["samples"]:
        assert len(s["rss"]) >= len(result["actors"]) + 1  # every actor and the driver
        assert all(v > 10 * 2**20 for k, v in s["rss"].items() if k != "ray-system/0")
        assert set(s["store"]) == {"used", "primary", "objects"} and s["driver_refs"] >= 0
    summary = result["summary"]
    series = [r["series"] for r in summary["rows"]]
    assert "object store used" in series and "rss driver (x1)" in series
    assert "rss generator (x2)" in series
    assert set(summary["per_actor"]) == set(result["samples"][0]["rss"])
    assert isinstance(summary["pass"], bool)
    # the store measure is real: an object put now shows up in it
    import numpy as np

    before = object_store_used()["used"]
    ref = ray_local.put(np.ones(8 * 2**20, dtype=np.uint8))
    assert object_store_used()["used"] >= before + 8 * 2**20
    del ref


def test_window_growth_compares_window_means():
    values = [100.0] * 10 + [110.0] * 10
    g = window_growth(values, base_index=2, window=4)
    assert g["base"] == 100.0 and g["end"] == 110.0 and g["growth"] == pytest.approx(0.1)
    assert window_growth([5.0], 0, 20)["growth"] == 0.0
