"""rollout.stop on the vLLM backend: its engine (with the tokenizer, which stop strings need)
keeps the tokens up to the one completing a match, with their log-probs, and the generator
cuts the text before it, as on the HF backend. One engine (~20 s on CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlalign_ray.config import ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs, load_causal_lm
from rlalign_ray.rollout.generator import Generator

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (bash launch/install_vllm.sh)",
    ),
]
STOPS = ["1", "5"]


def test_vllm_stops_at_stop_strings(tiny_model):
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
    cfg = RolloutConfig(
        max_new_tokens=12, backend="vllm", kv_cache_gb=0.25, max_model_len=64, stop=STOPS
    )
    gen = Generator(ModelConfig(path=tiny_model), cfg, seed=0)
    try:
        items = [PromptItem(i, p) for i, p in enumerate(["1+2=", "10+20=", "7+8=", "3+3="])]
        b = gen.generate(items, 8)
        hit = 0
        for i in range(len(b)):
            n = int(b.response_len[i])
            text = gen.tok.decode(b.response_ids[i, :n], skip_special_tokens=True)
            if any(s in text for s in STOPS):
                hit += 1
                # the last token completes the first match: nothing is sampled after it
                assert any(text.endswith(s) for s in STOPS)
                assert not any(s in text[:-1] for s in STOPS)
                assert b.completions[i] == text[:-1] and not bool(b.truncated[i])
            assert torch.all(b.logprobs[i, n:] == 0) and torch.all(b.response_mask[i, n:] == 0)
        assert hit >= 4
        # the recorded log-probs are exactly those of the kept tokens
        want = batch_logprobs(load_causal_lm(tiny_model), b, 1.0, 64, torch.device("cpu"))
        assert (want - b.logprobs).abs().max() < 1e-4
    finally:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        del gen
        destroy_model_parallel()
        destroy_distributed_environment()
        torch.set_num_threads = set_num_threads
