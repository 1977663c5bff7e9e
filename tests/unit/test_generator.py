"""The generator as a plain class (no Ray): shapes, log-probs, stale-weight refusal."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.config import ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs
from rlalign_ray.rollout.backend import SamplingParams, sample_step, truncate
from rlalign_ray.rollout.generator import Generator, StaleWeightsError


@pytest.fixture(scope="module")
def gen(tiny_model):
    return Generator(ModelConfig(path=tiny_model), RolloutConfig(max_new_tokens=5), seed=0)


def test_samples_are_grouped_and_masked(gen):
    items = [PromptItem(7, "1+2=", {"answer": "3"}), PromptItem(9, "10+20=", {"answer": "30"})]
    b = gen.generate(items, n_samples=3)
    assert b.group_ids.tolist() == [7, 7, 7, 9, 9, 9]
    assert b.columns == {"answer": ["3"] * 3 + ["30"] * 3}
    assert b.response_ids.shape[1] <= 5 and b.version == 0
    # mask covers exactly the generated tokens, and log-probs are zero elsewhere
    lengths = b.response_mask.sum(1).long()
    assert torch.equal(lengths, b.response_len)
    assert torch.all(b.logprobs[b.response_mask == 0] == 0)
    # the learner's forward pass gives the generator's log-probs
    again = batch_logprobs(gen.backend._model, b, 1.0, 4, torch.device("cpu"))
    assert torch.allclose(again, b.logprobs, atol=1e-5)


def test_refuses_stale_weights(gen):
    with pytest.raises(StaleWeightsError, match="holds weight version 0, the driver expects 1"):
        gen.generate([PromptItem(0, "1+1=")], n_samples=1, expected_version=1)


def test_model_generation_config_does_not_shape_samples(tiny_model):
    """A repetition penalty (as instruct models ship in generation_config) must not change
    what is sampled: greedy decoding equals the argmax of the plain forward pass."""
    g = Generator(ModelConfig(path=tiny_model), RolloutConfig(max_new_tokens=6), seed=0)
    g.backend._model.generation_config.repetition_penalty = 50.0
    g.backend._model.generation_config.top_k = 1
    ids = g.encode("12+34=")
    out = g.backend.generate([ids], SamplingParams(max_new_tokens=6, temperature=0), n=1)
    seq = torch.tensor([ids])
    with torch.no_grad():
        for t in range(int(out.lengths[0])):
            nxt = g.backend._model(seq).logits[0, -1].argmax()
            assert int(nxt) == int(out.tokens[0, t])
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


def test_truncation_and_recorded_logprobs():
    """top-k / top-p keep the right tokens; recorded log-probs are those of the
    renormalised (sampled) distribution, and equal the full one without truncation."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(truncate(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(truncate(logits, 0, 0.7))[0]
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    torch.manual_seed(0)
    tok, lp = sample_step(logits.repeat(64, 1), SamplingParams(1, top_p=0.7))
    assert set(tok.tolist()) <= {0, 1}
    expected = torch.log(torch.tensor([0.5, 0.3]) / 0.8)
    assert torch.allclose(lp, expected[tok])
    tok, lp = sample_step(logits.repeat(8, 1), SamplingParams(1, temperature=2.0))
    full = torch.log_softmax(logits[0] / 2.0, dim=-1)
    assert torch.allclose(lp, full[tok])


def test_ignore_eos_samples_full_length(gen):
    out = gen.backend.generate(
        [gen.encode("1+1=")], SamplingParams(max_new_tokens=7, ignore_eos=True), n=3
    )
    assert out.tokens.shape == (3, 7) and out.lengths.tolist() == [7, 7, 7]
