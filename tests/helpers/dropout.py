"""A tiny Llama whose config turns dropout on, and a learner run on it in one process
(DeepSpeed on gloo, one rank): what the first mini-batch's PPO ratio is."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch

DROPOUT = 0.3


def tiny_with_dropout(src: str, dst: str) -> str:
    """A copy of the tiny model folder ``src`` whose config asks for attention dropout."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = Path(dst, "config.json")
    data = json.loads(cfg.read_text())
    data["attention_dropout"] = DROPOUT
    cfg.write_text(json.dumps(data))
    return dst


def trained_rank(cfg):
    """A one-rank learner group in this process (DeepSpeed on a loopback rendezvous) after
    one step on a random batch of 8 rows: (learner, batch, its statistics)."""
    from rlalign_ray.bench.train import random_batch
    from rlalign_ray.learner.learner import Learner

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner = Learner(cfg, 0, 1)
    learner.setup("127.0.0.1", port)
    batch = random_batch(8, 6, learner.engine.module.config.vocab_size, prompt_tokens=5)
    stats = learner.train_step((batch, None), torch.ones(len(batch)), 0.0, 1)
    return learner, batch, stats


def first_update(model_path: str, keep_dropout: bool, device: str = "cpu") -> dict:
    """One learner step (one mini-batch, so no optimizer step happens before its last
    micro-batch) and the critic's values in train vs eval mode."""
    from rlalign_ray.config import config_from_dict
    from rlalign_ray.learner.critic import Critic

    gpus = 1 if device == "cuda" else 0
    cfg = config_from_dict(
        {
            "model": {"path": model_path, "keep_dropout": keep_dropout},
            "reward": {"rewards": [{"path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]},
            "rollout": {"prompts_per_step": 2, "n_samples": 4},
            "learner": {"micro_batch_size": 2, "optimizer": "sgd", "resources": {"num_gpus": gpus}},
            "critic": {"micro_batch_size": 2, "resources": {"num_gpus": gpus}},
        }
    )
    learner, batch, stats = trained_rank(cfg)
    critic = Critic(cfg, 0, 1)
    model = critic.build_model().to(learner.device)
    mb = batch.select(list(range(4)))
    values = []
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            values.append(critic._values(model, mb))
    return {
        "approx_kl": stats["approx_kl"],
        "clipfrac": stats["clipfrac"],
        "value_gap": float((values[0] - values[1]).abs().max()),
    }


if __name__ == "__main__":  # python -m tests.helpers.dropout MODEL KEEP [DEVICE]
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if sys.argv[3:] != ["cuda"] else "cuda")
    out = first_update(sys.argv[1], sys.argv[2] == "1", *(sys.argv[3:] or ["cpu"]))
    print("RESULT " + json.dumps(out))
