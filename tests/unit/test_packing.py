"""Packed rows (``data/packing.py``, ``models/loading.py``): the layout, the token-budget
groups, the rank balance, and log-probs, entropies and gradients equal to the padded path's;
a model that cannot pack is found out and not packed."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import _batch

from rlalign_ray.data.packing import budget_groups, pack, split_largest, token_groups
from rlalign_ray.models.loading import (
    base_hidden,
    load_causal_lm,
    response_hidden,
    response_logprobs,
)
from rlalign_ray.models.packing_probe import packing_problem
from rlalign_ray.roles import split_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_causal_lm(tiny_model)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_layout():
    b = _batch(64)  # prompts 2/4/3 (left-padded to 5), responses 4/1/6, a masked token in row 2
    rows = pack(b)  # one sequence
    assert rows.tokens == (2 + 4) + (4 + 1) + (3 + 6)
    assert rows.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    ]
    want = torch.cat([b.input_ids()[i][b.attention_mask()[i] != 0] for i in range(3)])
    assert rows.input_ids[0].tolist() == want.tolist()
    # row 0's response starts at packed index 2 (predicted from index 1), row 1's at 10,
    # row 2's at 14 with its token 3 (index 17, predicted from 16) not counted
    assert rows.predictors.tolist() == [1, 2, 3, 4, 9, 13, 14, 15, 17, 18]
    bins = pack(b, 0)  # bins of the longest row (9): row 2 | row 0 + filler | row 1 + filler
    assert bins.input_ids.shape == (3, 9)
    assert bins.position_ids.tolist() == [
        list(range(9)),
        [0, 1, 2, 3, 4, 5, 0, 1, 2],
        [0, 1, 2, 3, 4, 0, 1, 2, 3],
    ]
    assert bins.input_ids[0].tolist() == want[11:].tolist()
    assert bins.input_ids[1, :6].tolist() == want[:6].tolist()
    # row 0 from flat index 9 + 2 - 1, row 1 from 18 + 4 - 1, row 2 from 0 + 3 - 1
    assert bins.predictors.tolist() == [10, 11, 12, 13, 21, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("width", [None, 0, 12])
def test_packed_hidden_states_in_any_layout(model, width):
    b = _batch(model.config.vocab_size)
    rows = pack(b, width)
    hidden = base_hidden(model, CPU, input_ids=rows.input_ids, position_ids=rows.position_ids)
    want = response_hidden(model, b, CPU)[b.response_mask != 0]
    torch.testing.assert_close(hidden.flatten(0, 1)[rows.predictors], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 3])
def test_packed_logprobs_entropy_and_grads_match_padded(model, chunk):
    b = _batch(model.config.vocab_size)
    w = torch.linspace(-1, 1, 21).view(3, 7)  # an arbitrary loss weight per token
    logp_ref, ent_ref = response_logprobs(model, b, CPU, 0.7, chunk, entropy="loss")
    grad_ref = _grads(model, (w * (logp_ref + 0.1 * ent_ref)).sum())
    logp, ent = response_logprobs(model, b, CPU, 0.7, chunk, entropy="loss", packed=True)
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    assert torch.all(logp[b.response_mask == 0] == 0)
    grad = _grads(model, (w * (logp + 0.1 * ent)).sum())
    assert grad.keys() == grad_ref.keys()
    for name in grad_ref:
        torch.testing.assert_close(grad[name], grad_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_row_does_not_see_its_neighbour(model):
    b = _batch(model.config.vocab_size)
    logp, _ = response_logprobs(model, b, CPU, 1.0, packed=True)
    other = b.select([0, 1, 2])
    other.prompt_ids[0] = (other.prompt_ids[0] * 7 + 3) % model.config.vocab_size
    other.response_ids[0] = (other.response_ids[0] * 5 + 1) % model.config.vocab_size
    changed, _ = response_logprobs(model, other, CPU, 1.0, packed=True)
    assert not torch.allclose(changed[0], logp[0])  # row 0 changed ...
    torch.testing.assert_close(changed[1:], logp[1:], atol=1e-6, rtol=0)  # ... its neighbours not


def _ignore_the_mask(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    """Attention that knows causality but not packing (as custom kernels may)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def test_models_that_cannot_pack_are_found(model, tiny_model):
    from transformers import AttentionInterface

    assert packing_problem(model, CPU) is None  # sdpa
    assert packing_problem(load_causal_lm(tiny_model, attn_implementation="eager"), CPU) is None
    AttentionInterface.register("causal_only", _ignore_the_mask)
    other = load_causal_lm(tiny_model)
    other.set_attn_implementation("causal_only")
    problem = packing_problem(other, CPU)
    assert problem and "causal_only" in problem


@pytest.mark.full
def test_qwen2_packs_exactly(tmp_path):
    from rlalign_ray.models.tiny import build_tiny_model

    build_tiny_model(str(tmp_path), arch="qwen2")
    qwen = load_causal_lm(str(tmp_path))
    assert packing_problem(qwen, CPU) is None
    b = _batch(qwen.config.vocab_size)
    logp_ref, _ = response_logprobs(qwen, b, CPU, 1.0)
    logp, _ = response_logprobs(qwen, b, CPU, 1.0, packed=True)
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)


def test_token_budgets_and_rank_balance():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.distributions.LogNormal(3.0, 1.0).sample((64,)).long() + 1).tolist()
    for budget in (40, 100, 300):
        groups = budget_groups(lengths, budget)
        assert sorted(i for grp in groups for i in grp) == list(range(64))  # each row once
        for grp in groups:
            assert len(grp) == 1 or sum(lengths[i] for i in grp) <= budget
        split = split_largest(groups, lengths, len(groups) + 5)
        assert len(split) == len(groups) + 5
        assert sorted(i for grp in split for i in grp) == list(range(64))
    plen, rlen = torch.randint(1, 9, (64,), generator=g), torch.tensor(lengths)
    for grp in token_groups(plen, rlen, 300, packed=False):  # padded: the group's widths
        assert len(grp) == 1 or len(grp) * (plen[grp].max() + rlen[grp].max()) <= 300
    # ranks: equal row counts, every row once, tokens balanced far better than at random
    parts = split_rows(64, 4, seed=0, step=1, lengths=torch.tensor(lengths))
    assert [len(p) for p in parts] == [16] * 4
    assert sorted(torch.cat(parts).tolist()) == list(range(64))
    load = [sum(lengths[i] for i in p.tolist()) for p in parts]
    rand = [sum(lengths[i] for i in p.tolist()) for p in split_rows(64, 4, seed=0, step=1)]
    assert max(load) - min(load) < max(lengths) and max(load) - min(load) < max(rand) - min(rand)
    assert [p.tolist() for p in parts] == [
        p.tolist() for p in split_rows(64, 4, seed=0, step=1, lengths=torch.tensor(lengths))
    ]


def test_critic_values_packed_equal_padded(tiny_model):
    from rlalign_ray.config import config_from_dict
    from rlalign_ray.learner.critic import Critic

    reward = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]
    cfg = config_from_dict(
        {
            "model": {"path": tiny_model},
            "reward": {"rewards": reward},
            "algorithm": {"name": "ppo"},
            "critic": {"packing": True},
        }
    )
    critic = Critic(cfg, 0, 1)
    torch.manual_seed(0)
    head = critic.build_model()
    b = _batch(head.config.vocab_size)
    critic.packing = False
    padded = critic._values(head, b) * b.response_mask
    critic.packing = True
    packed = critic._values(head, b)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
