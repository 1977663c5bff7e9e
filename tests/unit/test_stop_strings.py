"""rollout.stop on the HF backend: a row ends with the token completing a stop string,
its log-probs are those of exactly the kept tokens, and the text is cut as vLLM cuts it."""

from __future__ import annotations

import torch
from helpers.stops import check_stopped_rows, pick_stop

from rlalign_ray.config import ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs
from rlalign_ray.rollout.backend import cut_at_stop
from rlalign_ray.rollout.generator import Generator


def test_cut_at_stop_follows_vllm():
    assert cut_at_stop("12\n34", ["\n"]) == "12"
    assert cut_at_stop("12\n34", ["\n"], include=True) == "12\n"
    assert cut_at_stop("abcdef", ["cd", "bcx", "de"]) == "ab"  # the match ending first
    assert cut_at_stop("abcdef", ["ef", "bcd"]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc"


def test_hf_backend_stops_at_stop_strings(tiny_model):
    items = [PromptItem(i, p) for i, p in enumerate(["1+2=", "10+20=", "7+8=", "3+3="])]
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0)
    free = Generator(ModelConfig(path=tiny_model), cfg, seed=0).generate(items, 4, seed=3)
    # a stop string: a character sampled mid-response in some rows (random-init model)
    texts = free.completions
    stop = pick_stop(texts)
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0, stop=[stop, "@@"])
    gen = Generator(ModelConfig(path=tiny_model), cfg, seed=0)
    b = gen.generate(items, 4, seed=3)
    check_stopped_rows(b, free, stop, gen.tok)
    # behaviour log-probs cover exactly the kept tokens
    for i in range(len(b)):
        n = int(b.response_len[i])
        assert torch.equal(b.logprobs[i, :n], free.logprobs[i, :n])
        assert torch.all(b.logprobs[i, n:] == 0)
    again = batch_logprobs(gen.backend._model, b, 1.0, 8, torch.device("cpu"))
    assert torch.allclose(again, b.logprobs, atol=1e-5)
    # include_stop_str_in_output keeps the stop string in the text
    cfg = RolloutConfig(max_new_tokens=12, stop=[stop], include_stop_str_in_output=True)
    kept = Generator(ModelConfig(path=tiny_model), cfg, seed=0).generate(items, 4, seed=3)
    assert all(c.endswith(stop) for c, t in zip(kept.completions, texts) if stop in t)
