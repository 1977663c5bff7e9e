"""Dropout is off for the policy, critic and reference unless ``model.keep_dropout``: PPO's
ratio is exactly 1 on the first mini-batch, and the critic's train-mode values equal the
eval-mode values the value loss compares them with, for a model whose config has dropout."""

from __future__ import annotations

import pytest

from rlalign_ray.models.loading import load_causal_lm, without_dropout
from tests.helpers.dropout import DROPOUT, tiny_with_dropout
from tests.helpers.subproc import run_helper


@pytest.fixture(scope="module")
def dropout_model(tiny_model, tmp_path_factory) -> str:
    return tiny_with_dropout(tiny_model, str(tmp_path_factory.mktemp("dropout-llama")))


def test_without_dropout_zeroes_the_config_and_every_module(dropout_model):
    from transformers import AutoModelForTokenClassification

    kept = load_causal_lm(dropout_model)
    assert kept.config.attention_dropout == DROPOUT
    model = load_causal_lm(dropout_model, dropout=False)
    assert model.config.attention_dropout == 0.0
    assert all(m.self_attn.attention_dropout == 0.0 for m in model.model.layers)
    head = AutoModelForTokenClassification.from_pretrained(dropout_model, num_labels=1)
    assert head.dropout.p > 0  # transformers' own default for a value head: 0.1
    assert without_dropout(head).dropout.p == 0.0


@pytest.mark.integration
@pytest.mark.parametrize("keep", [False, True])
def test_first_minibatch_ratio_is_one_without_dropout(dropout_model, keep):
    got = run_helper("dropout", dropout_model, str(int(keep)))
    if keep:  # the check sees dropout when it is on
        assert got["approx_kl"] > 1e-6 and got["value_gap"] > 1e-6
    else:
        assert got["approx_kl"] == 0.0 and got["clipfrac"] == 0.0
        assert got["value_gap"] == 0.0
