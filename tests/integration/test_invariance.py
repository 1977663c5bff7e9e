"""The update does not depend on how a batch is split: 1, 2 or 4 micro-batches, token-budget
micro-batches, chunked log-probs, 1 or 2 learner ranks (ZeRO 0, 2 and 3), padded or packed
rows (``learner.packing``, ranks balanced by tokens) give the same loss and the same gradient
(plain SGD with lr=1 turns the weight change into minus the gradient, through the real
DeepSpeed engine). The reference is always one rank, one padded micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.data.packing import row_tokens
from rlalign_ray.data.prompts import load_prompts
from rlalign_ray.learner.base import rank_batches
from rlalign_ray.learner.learner import Learner
from rlalign_ray.roles import split_rows
from rlalign_ray.rollout.generator import Generator

pytestmark = pytest.mark.integration


@pytest.fixture
def batch_ref(ray_local, tiny_model):
    cfg = config_from_dict(small_config(tiny_model, "/tmp/unused", rollout={"max_new_tokens": 6}))
    gen = Generator(cfg.model, cfg.rollout, seed=0)
    items = load_prompts(str(REPO / "configs/data/arith_eval.jsonl"))[:4]
    batch = gen.generate(items, n_samples=2)  # 8 rows
    # rows 2, 4 and 5 (rank 0's in the 2-rank split) end after one token, so with a 24-token
    # budget rank 0 packs 2 micro-batches and rank 1 4: rank 0 must split to match
    batch.response_len[[2, 4, 5]] = 1
    batch.response_mask[[2, 4, 5], 1:] = 0
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(len(batch), generator=g)  # one per row, as outcome estimators ship
    return batch, adv


def _update(
    ray, tiny_model, batch_ref, world, micro, agg, chunk=0, budget=0, zero=None, packing=False
):
    batch, adv = batch_ref
    cfg = config_from_dict(
        small_config(
            tiny_model,
            "/tmp/unused",
            algorithm={"kl_coef": 0.0, "loss_agg": agg, "clip_low": 10.0, "clip_high": 10.0},
            learner={
                "world_size": world,
                "micro_batch_size": micro,
                "optimizer": "sgd",
                "lr": 1.0,
                "grad_clip": 0.0,
                "zero_stage": (2 if world > 1 else 0) if zero is None else zero,
                "logprob_chunk_size": chunk,
                "max_tokens_per_micro_batch": budget,
                "packing": packing,
            },
            data={"max_prompt_tokens": 16},
        )
    )
    lengths = row_tokens(batch) if packing else None  # as LearnerGroup.rows splits them
    rows = split_rows(len(batch), world, cfg.run.seed, 1, lengths)
    parts = rank_batches(rows, None, 1, batch)
    parts = parts if world > 1 else [parts]
    actors = [
        ray.remote(Learner).options(num_cpus=0.25).remote(cfg, i, world) for i in range(world)
    ]
    try:
        addr, port = ray.get(actors[0].address.remote())
        ray.get([a.setup.remote(addr, port) for a in actors])
        before = ray.get([a.get_weights.remote() for a in actors])[0]  # ZeRO-3: all gather
        assert ray.get(actors[0].__ray_call__.remote(lambda a: a.packing)) == packing
        metrics = ray.get(
            [a.train_step.remote(p, adv[r], 0.0, 1) for a, p, r in zip(actors, parts, rows)]
        )
        after = ray.get([a.get_weights.remote() for a in actors])[0]
    finally:
        for a in actors:
            ray.kill(a)
    return metrics[0]["loss"], {k: before[k] - after[k] for k in before}


# (loss aggregation, ranks, micro-batch rows, log-prob chunk, token budget, ZeRO stage or
# None: the default, packed rows)
_FULL = pytest.mark.full
SPLITS = [
    pytest.param("token-mean", 1, 4, 0, 0, None, False, marks=_FULL),
    pytest.param("token-mean", 1, 2, 3, 0, None, False, marks=_FULL),
    pytest.param("token-mean", 2, 4, 5, 0, None, False, marks=_FULL),
    pytest.param("token-mean", 2, 2, 0, 0, None, False, marks=_FULL),
    pytest.param("token-mean", 1, 8, 4, 40, None, False, marks=_FULL),
    pytest.param("token-mean", 2, 4, 0, 24, None, False, marks=_FULL),
    pytest.param("token-mean", 2, 4, 7, 0, 3, False),  # two ranks, ZeRO-3, log-prob chunks
    pytest.param("seq-mean-token-mean", 1, 2, 0, 0, None, False, marks=_FULL),
    pytest.param("seq-mean-token-mean", 2, 2, 2, 0, None, False, marks=_FULL),
    pytest.param("seq-mean-token-mean", 2, 4, 0, 24, None, False),  # two ranks, token budget
    # packed rows: every aggregation mode, token budgets of real tokens (16: micro-batches
    # of one and two rows; 24 on two balanced ranks: one rank splits to match the other)
    pytest.param("token-mean", 2, 4, 0, 24, None, True),  # two ranks, packed, token budget
    pytest.param("token-mean", 1, 4, 0, 0, None, True, marks=_FULL),
    pytest.param("token-mean", 2, 4, 3, 16, 3, True, marks=_FULL),
    pytest.param("token-sum", 1, 8, 0, 16, None, True, marks=_FULL),
    pytest.param("seq-mean-token-sum", 2, 4, 0, 24, None, True, marks=_FULL),
    pytest.param("seq-mean-token-mean", 1, 8, 5, 16, None, True, marks=_FULL),
    pytest.param("seq-mean-token-sum-norm", 2, 4, 0, 24, 2, True, marks=_FULL),
]
_BASE: dict = {}


@pytest.mark.parametrize(
    "agg, world, micro, chunk, budget, zero, packing",
    SPLITS,
    ids=[
        f"{s[0]}-w{s[1]}-m{s[2]}-c{s[3]}-b{s[4]}-z{s[5]}" + ("-packed" if s[6] else "")
        for s in (p.values for p in SPLITS)
    ],
)
def test_same_loss_and_gradient_for_any_split(
    ray_local, tiny_model, batch_ref, agg, world, micro, chunk, budget, zero, packing
):
    if agg not in _BASE:  # one rank, one padded micro-batch, log-probs at once
        _BASE[agg] = _update(ray_local, tiny_model, batch_ref, world=1, micro=8, agg=agg)
    base_loss, base_grad = _BASE[agg]
    assert any(np.abs(g).max() > 1e-6 for g in base_grad.values())
    loss, grad = _update(
        ray_local, tiny_model, batch_ref, world, micro, agg, chunk, budget, zero, packing
    )
    assert loss == pytest.approx(base_loss, abs=1e-5 if packing else 1e-6)
    for name in base_grad:  # atol: 2 fp32 ulps of the weights the change is the difference
        ulps = 2.5e-7 * max(1.0, float(np.abs(base_grad[name]).max()))  # of (near 1, or g)
        np.testing.assert_allclose(grad[name], base_grad[name], rtol=1e-4, atol=ulps, err_msg=name)
