"""In-flight weight updates on the vLLM backend: the engine driven step by step, a load
between two steps, vLLM's weight-version spans as per-token versions; then a pipelined run
with vLLM generators in Ray actors (their engines run in the actors' default-group thread,
the loads in the ``weights`` thread).

Extended tier: two engines start here (~20 s each on CPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import small_config

from rlalign_ray.config import ModelConfig, RolloutConfig, config_from_dict
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs, load_causal_lm
from rlalign_ray.rollout.backend import SamplingParams
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.trainers import Trainer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.full,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (bash launch/install_vllm.sh)",
    ),
]
ENGINE = {"backend": "vllm", "kv_cache_gb": 0.25, "max_model_len": 64}
LOAD_AT = 4  # the load happens before the engine's 4th step


@pytest.fixture(scope="module")
def gen(tiny_model):
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
    g = Generator(ModelConfig(path=tiny_model), RolloutConfig(max_new_tokens=12, **ENGINE), 0)
    yield g
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    del g
    destroy_model_parallel()
    destroy_distributed_environment()
    torch.set_num_threads = set_num_threads


@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_vllm_continues_the_same_sequences_across_a_load(gen, tiny_model, tmp_path, kv):
    from rlalign_ray.models.tiny import build_tiny_model

    old = load_causal_lm(tiny_model)
    new, _ = build_tiny_model(str(tmp_path / "other"), seed=1)
    prompts = [gen.encode(p) for p in ("1+2=", "123+456=", "9+")]
    calls = []

    def pause() -> int:
        calls.append(len(calls))
        if len(calls) == LOAD_AT + 1:
            gen.backend.load_weights(list(new.named_parameters()))
            gen.backend.finish_weight_update()
        return int(len(calls) > LOAD_AT)

    gen.backend.recompute = kv == "recompute"
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    try:
        out = gen.backend.generate(prompts, params, n=4, pause=pause)
    finally:  # the old weights back for the next test
        gen.backend.load_weights(list(old.named_parameters()))
        gen.backend.finish_weight_update()
    v = out.versions
    assert v.shape == out.tokens.shape == (12, 12)
    switch = int((v[0] == 0).sum())  # every request runs in every step: the same switch
    assert 0 < switch < 12 and v[:, :switch].eq(0).all() and v[:, switch:].eq(1).all()
    batch = gen._assemble(
        [PromptItem(i, "") for i in range(3)],
        [""] * 3,
        prompts,
        [(i, s) for i in range(3) for s in range(4)],
        out,
    )
    before = batch_logprobs(old, batch, 1.0, 64, torch.device("cpu"))
    after = batch_logprobs(new, batch, 1.0, 64, torch.device("cpu"))
    assert (before - out.logprobs)[:, :switch].abs().max() < 1e-4
    if kv == "recompute":  # preempted and recomputed: the new version's log-probs exactly
        assert (after - out.logprobs)[:, switch:].abs().max() < 1e-4
    else:  # the old KV blocks kept: neither version's
        assert (after - out.logprobs)[:, switch].abs().max() > 1e-3


def test_pipelined_run_with_vllm_generators_loads_mid_chunk(ray_local, tiny_model, tmp_path):
    out = tmp_path / "run"
    raw = small_config(
        tiny_model,
        str(out),
        rollout={
            "prompts_per_step": 4,
            "n_samples": 4,
            "max_new_tokens": 48,
            "ignore_eos": True,
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
            "inflight_updates": True,
            **ENGINE,
        },
        learner={"world_size": 1, "micro_batch_size": 16, "resources": {"num_cpus": 0.5}},
        trainer={"steps": 4, "eval_every": 0, "max_staleness": 1},
    )
    raw["data"].pop("eval")
    Trainer(config_from_dict(raw)).fit()
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]
    assert all(0 <= r["rollout/version_lag_mean"] <= 1 for r in rows)
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)
    print("in-flight loads per step:", [r["rollout/inflight_loads"] for r in rows])
