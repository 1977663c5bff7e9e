"""In-flight updates on a tensor-parallel vLLM engine (``rollout.vllm.tensor_parallel_size:
2`` with ``rollout.inflight_updates``): the engine is built and driven from the generator's
engine thread, a weight version reaches its two workers between two decode steps of a chunk
(through the shared-memory transport, each worker mapping the segment), and every token
records the version that sampled it. Checked from the learner's side: each token's log-prob
is the one of the weights its version names (``inflight_kv: recompute``: the prefix's KV
is computed again with the new weights).

No Ray, as in ``test_vllm_tp.py`` (whose sender and model this borrows); its own engine, so
it runs after that module's engine is shut down.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import VLLM_TESTS
from helpers.inflight import HoldingGate
from test_vllm_tp import TEMPERATURE, Sender, _plan, _scaled, wide_model  # noqa: F401

from rlalign_ray.config import ModelConfig, RolloutConfig, VLLMConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs, load_causal_lm

pytestmark = [
    *VLLM_TESTS,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two engine workers need two cores"),
]


@pytest.fixture
def inflight_engine(wide_model):  # noqa: F811 (the borrowed fixture)
    from rlalign_ray.rollout.generator import Generator

    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
    bind = "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    import vllm.envs

    vllm.envs.disable_envs_cache()
    rollout = RolloutConfig(
        backend="vllm",
        vllm=VLLMConfig(tensor_parallel_size=2, kv_cache_gb=0.25, max_model_len=64),
        max_new_tokens=8,
        temperature=TEMPERATURE,
        inflight_updates=True,
        inflight_kv="recompute",
    )
    gen = Generator(ModelConfig(path=wide_model), rollout, seed=0)
    gen.gate = HoldingGate()  # holds the chunk at its second decode step until a load
    gen.gate.hold = True
    yield gen
    gen.engine.run(lambda: gen.backend.llm.llm_engine.engine_core.shutdown())
    if bind:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    torch.set_num_threads = set_num_threads


def test_tp2_engine_loads_a_version_between_decode_steps(inflight_engine, wide_model):  # noqa: F811
    gen = inflight_engine
    params = dict(load_causal_lm(wide_model).named_parameters())
    plan = _plan("shared_memory", params, gen.weight_ranks())
    sender = Sender(plan, params, gen)
    items = [PromptItem(i, p) for i, p in enumerate(["1+2=", "123+456=", "9+", "77+8="])]
    out: dict = {}
    sampling = threading.Thread(
        target=lambda: out.update(zip(("batch", "info"), gen.generate_chunk(items, 2, seed=7)))
    )
    sampling.start()
    for b in range(len(plan.buckets)):  # each waits until the chunk takes it between steps
        sender.load(1, b, 1.1)
    sampling.join(timeout=300)
    assert not sampling.is_alive()
    sender.end.close()
    batch, info = out["batch"], out["info"]
    assert info["inflight_loads"] == 1 and gen.version == 1
    versions = batch.token_versions
    mask = batch.response_mask.bool()
    assert set(versions[mask].tolist()) == {0, 1}, versions  # both versions sampled tokens
    old = batch_logprobs(load_causal_lm(wide_model), batch, TEMPERATURE, 16, torch.device("cpu"))
    new = batch_logprobs(_scaled(wide_model, 1.1), batch, TEMPERATURE, 16, torch.device("cpu"))
    want = torch.where(versions == 0, old, new)
    diff = (want - batch.logprobs)[mask].abs().max()
    print(f"max |generator - learner of the token's version| log-prob: {diff:.2e}")
    assert diff < 1e-3
