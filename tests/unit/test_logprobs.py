"""The learner's log-prob path (response positions only, chunked, recomputed in backward)
gives the log-probs, entropies and gradients of the plain full-logits computation."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.algorithms import entropy_from_logits
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.models.loading import load_causal_lm, position_ids, response_logprobs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_causal_lm(tiny_model)


def _batch(vocab: int) -> RolloutBatch:
    """3 rows: prompts of 2/4/3 tokens (left-padded to 5), responses of 4/1/6 tokens
    (right-padded to 7), one masked token inside the last response."""
    g = torch.Generator().manual_seed(0)
    plen, rlen = torch.tensor([2, 4, 3]), torch.tensor([4, 1, 6])
    prompt_mask = (torch.arange(5)[None, :] >= 5 - plen[:, None]).long()
    response_mask = (torch.arange(7)[None, :] < rlen[:, None]).float()
    response_mask[2, 3] = 0
    return RolloutBatch(
        prompt_ids=torch.randint(4, vocab, (3, 5), generator=g) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(4, vocab, (3, 7), generator=g) * (response_mask > 0),
        response_len=rlen,
        response_mask=response_mask,
        logprobs=torch.zeros(3, 7),
        version=0,
        group_ids=torch.zeros(3, dtype=torch.long),
        prompts=["a"] * 3,
        completions=["b"] * 3,
        columns={},
    )


def _full_logits(model, b: RolloutBatch, temperature: float):
    """The plain path: logits for every position, then log-softmax (the reference)."""
    attn = b.attention_mask()
    out = model(input_ids=b.input_ids(), attention_mask=attn, position_ids=position_ids(attn))
    p, t = b.prompt_ids.shape[1], b.response_ids.shape[1]
    logits = out.logits[:, p - 1 : p + t - 1].float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, b.response_ids[..., None]).squeeze(-1)
    return logp * b.response_mask, entropy_from_logits(logits) * b.response_mask


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [0, 1, 5, 64])
def test_chunked_logprobs_match_full_logits(model, chunk):
    b = _batch(model.config.vocab_size)
    w = torch.linspace(-1, 1, 21).view(3, 7)  # an arbitrary loss weight per token
    logp_ref, ent_ref = _full_logits(model, b, 0.7)
    grad_ref = _grads(model, (w * (logp_ref + 0.1 * ent_ref)).sum())
    logp, ent = response_logprobs(model, b, CPU, 0.7, chunk, entropy="loss")
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    grad = _grads(model, (w * (logp + 0.1 * ent)).sum())
    assert grad.keys() == grad_ref.keys()  # tied embeddings: the head's weight is the input's
    for name in grad_ref:
        torch.testing.assert_close(grad[name], grad_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_entropy_metric_has_no_graph_and_trimming_keeps_results(model):
    b = _batch(model.config.vocab_size)
    logp, ent = response_logprobs(model, b, CPU, 1.0, 2, entropy="metric")
    assert logp.requires_grad and not ent.requires_grad
    assert torch.all(logp[b.response_mask == 0] == 0) and torch.all(ent[b.response_mask == 0] == 0)
    short = b.select([1]).trimmed()  # 4 prompt tokens, 1 response token
    assert short.prompt_ids.shape == (1, 4) and short.response_ids.shape == (1, 1)
    again, _ = response_logprobs(model, short, CPU, 1.0, 2)
    torch.testing.assert_close(again, logp[1:2, :1], atol=1e-5, rtol=1e-5)
    assert response_logprobs(model, b, CPU, 1.0, 2)[1] is None


def test_models_that_transform_their_logits():
    """Gemma-2 soft-caps its logits after the head (a cap that bites: 0.05): applying the head ourselves repeats it,
    so log-probs and gradients equal the model's own."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.05,
    )  # fmt: skip
    model = Gemma2ForCausalLM(cfg).float()
    b = _batch(cfg.vocab_size)
    logp_ref, _ = _full_logits(model, b, 0.7)
    grad_ref = _grads(model, logp_ref.sum())
    logp, _ = response_logprobs(model, b, CPU, 0.7, 4)
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)
    grad = _grads(model, logp.sum())
    for name in grad_ref:
        torch.testing.assert_close(grad[name], grad_ref[name], atol=1e-5, rtol=1e-4, msg=name)
