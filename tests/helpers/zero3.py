"""A one-rank ZeRO-3 learner in this process (DeepSpeed on gloo) trained on batches whose
response lengths differ, so that the log-prob chunks differ from micro-batch to
micro-batch: whether DeepSpeed keeps its recorded module order (and so its parameter
prefetching) or throws it away ("Invalidate trace cache")."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys

import torch


def trace_run(model_path: str, wrap: bool) -> dict:
    """Three steps of 8 rows, response lengths 3 to 10, chunks of 4 tokens; ``wrap``: with
    the learner's one-call head (else, for comparison, the head called per chunk as
    before: DeepSpeed then drops its trace on most micro-batches)."""
    from rlalign_ray.bench.train import random_batch
    from rlalign_ray.config import config_from_dict
    from rlalign_ray.learner.learner import Learner
    from rlalign_ray.models import loading

    class TracedLearner(Learner):
        def ds_config(self):
            cfg = super().ds_config()
            cfg["zero_optimization"]["log_trace_cache_warnings"] = True
            return cfg

    if not wrap:
        loading.attach_logprob_head = lambda model: False
        sys.modules["rlalign_ray.learner.learner"].attach_logprob_head = lambda model: False
    cfg = config_from_dict(
        {
            "model": {"path": model_path},
            "reward": {"rewards": [{"path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]},
            "rollout": {"prompts_per_step": 2, "n_samples": 4},
            "learner": {
                "micro_batch_size": 2,
                "zero_stage": 3,
                "logprob_chunk_size": 4,
                "lr": 1e-3,
            },
        }
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    learner = TracedLearner(cfg, 0, 1)
    learner.setup("127.0.0.1", port)
    vocab = learner.engine.module.config.vocab_size
    logs, stats = [], []
    for step in range(1, 4):  # step 1 records DeepSpeed's trace (an eval pass, then training)
        torch.manual_seed(step)
        batch = random_batch(8, 12, vocab, prompt_tokens=5)
        batch.response_len = torch.arange(3, 11)  # 3..10 tokens: 1 to 3 chunks of 4
        batch.response_mask = (torch.arange(12)[None] < batch.response_len[:, None]).float()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            adv = torch.linspace(-1, 1, len(batch))
            stats.append(learner.train_step((batch, None), adv, 0.0, step))
        logs.append([x for x in out.getvalue().splitlines() if "Invalidate trace cache" in x])
    coordinator = learner.engine.optimizer.parameter_offload.get_param_coordinator()
    return {
        "invalidated_after_step_1": sum(len(x) for x in logs[1:]),
        "log": logs,
        "stats": stats,
        "weights": {n: float(v.sum()) for n, v in learner.get_weights().items()},
        "complete": coordinator.is_complete_trace(),
        "wrapped": hasattr(learner.engine.module, loading.LOGPROB_HEAD),
    }


if __name__ == "__main__":  # python -m tests.helpers.zero3 MODEL WRAP
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print("RESULT " + json.dumps(trace_run(sys.argv[1], sys.argv[2] == "1")))
