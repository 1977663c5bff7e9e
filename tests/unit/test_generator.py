"""The generator as a plain class (no Ray): shapes, log-probs, stale-weight refusal."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.config import ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs
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
