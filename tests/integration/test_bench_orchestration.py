"""``bench pipeline --simulate`` and ``bench scale``: the real Trainer with simulated actors,
small, end to end through the CLI; the JSON carries the keys the benchmarks promise. The
timings are not checked here (targets are reported by the benchmarks themselves)."""

from __future__ import annotations

import json

import pytest
import torch

from rlalign_ray.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.full
def test_bench_pipeline_simulate_writes_its_results(ray_local, tmp_path):
    out = tmp_path / "pipeline.json"
    argv = ["bench", "pipeline", "--simulate", "gen=0.05,train=0.05,tail=lognormal:1.0",
            "--max-staleness", "0,1", "--steps", "4", "--skip", "1", "--generators", "2",
            "--rewards", "1", "--prompts", "8", "--n-samples", "2", "--json", str(out)]  # fmt: skip
    torch.set_num_threads(2)  # the driver trains with run.driver_threads (1), then restores
    assert main(argv) == 0
    assert torch.get_num_threads() == 2
    result = json.loads(out.read_text())
    assert [r["max_staleness"] for r in result["results"]] == [0, 1]
    for r in result["results"]:
        assert set(r) == {"max_staleness", "inflight_updates", "step_s", "ideal_s", "ratio"}
        assert r["step_s"] > 0 and r["ratio"] == pytest.approx(r["step_s"] / r["ideal_s"])
    assert set(result["longtail"]) == {"static_step_s", "pull_step_s"}


@pytest.mark.slow
def test_bench_scale_on_a_two_node_cluster(no_ray, tmp_path):
    out = tmp_path / "scale.json"
    argv = ["bench", "scale", "--simulate", "--actors", "4", "--workers", "1", "--steps", "3",
            "--skip", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [set(r) for r in result["results"]] == [{"actors", "driver_s_per_step"}]
    assert result["results"][0]["actors"] == 4 and result["results"][0]["driver_s_per_step"] > 0
    assert result["runs"][0]["nodes"] == 2


@pytest.mark.full
def test_bench_train_padded_vs_packed_writes_its_results(tmp_path):
    """Both paths on the same rows, in fresh processes; the loss and gradient agree."""
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--lengths", "lognormal:1.0", "--hidden", "64", "--layers", "1",
            "--vocab", "256", "--rows", "8", "--seq", "8", "--micro-batch", "4",
            "--cache-dir", str(tmp_path / "models"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["path"] for r in result["results"]] == ["padded", "packed"]
    padded, packed = result["results"]
    assert padded["real_tokens"] == packed["real_tokens"] <= packed["computed_tokens"]
    assert padded["computed_tokens"] > padded["real_tokens"]
    assert result["padded_tokens_per_s"] > 0 and result["packed_tokens_per_s"] > 0
    assert result["loss_abs_diff"] <= 1e-5 and result["grad_rel_diff"] <= 1e-4
