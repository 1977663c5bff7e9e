"""The update does not depend on how a batch is split: 1, 2 or 4 micro-batches, 1 or 2
learner ranks give the same loss and the same gradient (plain SGD with lr=1 turns the
weight change into minus the gradient, through the real DeepSpeed engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.data.prompts import load_prompts
from rlalign_ray.learner.learner import Learner
from rlalign_ray.rollout.generator import Generator

pytestmark = pytest.mark.integration


@pytest.fixture
def batch_ref(ray_local, tiny_model):
    cfg = config_from_dict(small_config(tiny_model, "/tmp/unused", rollout={"max_new_tokens": 6}))
    gen = Generator(cfg.model, cfg.rollout, seed=0)
    items = load_prompts(str(REPO / "configs/data/arith_eval.jsonl"))[:4]
    batch = gen.generate(items, n_samples=2)  # 8 rows of different lengths
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(len(batch), generator=g)[:, None] * batch.response_mask
    return ray_local.put(batch), adv


def _update(ray, tiny_model, batch_ref, world, micro, agg):
    ref, adv = batch_ref
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
                "zero_stage": 2 if world > 1 else 0,
            },
        )
    )
    actors = [
        ray.remote(Learner).options(num_cpus=0.25).remote(cfg, i, world) for i in range(world)
    ]
    try:
        addr, port = ray.get(actors[0].address.remote())
        ray.get([a.setup.remote(addr, port) for a in actors])
        before = ray.get(actors[0].get_weights.remote())
        metrics = ray.get([a.train_step.remote([ref], None, adv, None, 0.0, 1) for a in actors])
        after = ray.get(actors[0].get_weights.remote())
    finally:
        for a in actors:
            ray.kill(a)
    return metrics[0]["loss"], {k: before[k] - after[k] for k in before}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_same_loss_and_gradient_for_any_split(ray_local, tiny_model, batch_ref, agg):
    base_loss, base_grad = _update(ray_local, tiny_model, batch_ref, world=1, micro=8, agg=agg)
    assert any(np.abs(g).max() > 1e-6 for g in base_grad.values())
    splits = [(1, 4), (1, 2), (2, 4), (2, 2)] if agg == "token-mean" else [(1, 2), (2, 2)]
    for world, micro in splits:
        loss, grad = _update(ray_local, tiny_model, batch_ref, world, micro, agg)
        assert loss == pytest.approx(base_loss, abs=1e-6), (world, micro)
        for name in base_grad:
            np.testing.assert_allclose(
                grad[name],
                base_grad[name],
                rtol=1e-4,
                atol=1e-7,
                err_msg=f"{name} with {world} ranks, micro {micro}",
            )
