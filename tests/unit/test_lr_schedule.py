"""learner.lr_scheduler: DeepSpeed's scheduler block gives the expected lr at every step."""

import math

import pytest
import torch
from deepspeed.runtime import lr_schedules

from rlalign_ray.config import load_config
from rlalign_ray.errors import ConfigError
from rlalign_ray.learner.base import lr_schedule, optimizer_steps

LR = 1e-3


def _cfg(*over):
    base = [
        "trainer.steps=5",
        "rollout.prompts_per_step=4",
        "rollout.n_samples=2",
        "learner.mini_batch_size=4",  # 2 optimizer steps per training step
        "learner.micro_batch_size=4",
        f"learner.lr={LR}",
    ]
    return load_config("configs/demo_cpu.yaml", base + list(over))


def _lrs(cfg):
    """The lr of each optimizer step, the way DeepSpeed's engine drives its scheduler:
    built from the config block, stepped to the start iteration (``DeepSpeedRank.setup``),
    then one ``step()`` after each optimizer step."""
    block, start = lr_schedule(cfg.learner, cfg)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = getattr(lr_schedules, block["type"])(opt, **block["params"])
    sched.step(start)
    out = []
    for _ in range(optimizer_steps(cfg)):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def test_optimizer_steps_count_epochs_and_mini_batches():
    assert optimizer_steps(_cfg()) == 10
    assert optimizer_steps(_cfg("learner.update_epochs=2")) == 20


def test_linear_with_warmup():
    got = _lrs(_cfg("learner.lr_scheduler=linear", "learner.lr_warmup_steps=4"))
    t, w = 10, 4
    want = [LR * s / w if s < w else LR * (t + 1 - s) / (t + 1 - w) for s in range(1, t + 1)]
    assert got == pytest.approx(want)
    assert got[0] > 0 and got[-1] > 0 and max(got) == pytest.approx(LR)


def test_linear_without_warmup_starts_at_the_full_lr():
    got = _lrs(_cfg("learner.lr_scheduler=linear"))
    assert got == pytest.approx([LR * (11 - s) / 10 for s in range(1, 11)])


def test_cosine_with_warmup_to_min_ratio():
    got = _lrs(
        _cfg("learner.lr_scheduler=cosine", "learner.lr_warmup_steps=2", "learner.lr_min_ratio=0.1")
    )
    t, w = 10, 2
    want = []
    for s in range(1, t + 1):
        if s < w:
            want.append(LR * s / w)
        else:
            p = (s - w + 1) / (t + 1 - w)
            want.append(LR * (0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2))
    assert got == pytest.approx(want)
    assert all(a >= b for a, b in zip(got[1:], got[2:]))  # decays after the warm-up


def test_constant_with_warmup_then_flat():
    got = _lrs(_cfg("learner.lr_warmup_steps=4"))
    assert got == pytest.approx([LR / 4, LR / 2, 3 * LR / 4] + [LR] * 7)


def test_bad_scheduler_config():
    with pytest.raises(ConfigError, match="learner.lr_scheduler: use one of constant, linear"):
        _cfg("learner.lr_scheduler=step")
