"""bench train: tokens/s and peak memory of one learner step, against one fp32 logits tensor.

A learner step is the real ``Learner.train_step`` (one rank, DeepSpeed, AdamW): one
forward and backward of the policy loss over ``--micro-batch`` rows of 16 prompt and
``--seq`` response tokens (random tokens), then the optimizer step. Peak memory is the
peak RSS during the step minus the RSS before it, after a warm-up step (so optimizer state
and allocator pools exist), in a fresh process per configuration: without ``--in-process``
this command runs itself with ``--in-process`` once for ``--chunk 0`` (the log-probs all
at once) and once for ``--chunk N``, so ``/usr/bin/time -v rlalign-ray bench train
--in-process ...`` measures the same thing from outside. The limit is one fp32 (B, T, V)
logits tensor (B = micro-batch, T = seq, V = vocab).

With ``--lengths lognormal:S`` the rows' response lengths are drawn around ``--seq``
(median ``--seq``, sigma S, capped at 8x ``--seq``) and a step over ``--rows`` rows runs
padded (``--micro-batch`` rows per micro-batch, each padded to its longest row) and packed
(``learner.packing`` with a budget of ``--max-tokens`` real tokens); see
``bench/train_lengths.py``. Reported: real (non-pad) tokens/s, peak memory, and the loss and
gradient differences between the two paths (the same model and rows). The limit is the
padded path measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from rlalign_ray.bench.common import PeakMemory, add_model_arguments, bench_model, gb, print_table

PROMPT_TOKENS = 16
COLUMNS = (
    "chunk",
    "micro_batch",
    "seq",
    "vocab",
    "tokens_per_s",
    "peak_gb",
    "logits_gb",
    "ratio_vs_logits",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per step (B)")
    p.add_argument(
        "--seq",
        type=int,
        default=0,
        help="response tokens per row (T; lognormal: the median); 0: 512, lognormal 128",
    )
    p.add_argument(
        "--chunk", type=int, default=512, help="learner.logprob_chunk_size (also run with 0)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="learner.gradient_checkpointing"
    )
    p.add_argument("--in-process", action="store_true", help="measure here, one configuration")
    p.add_argument(
        "--lengths",
        default="fixed",
        type=lengths_arg,
        help="response lengths: fixed (--seq each), or lognormal:S (padded vs packed)",
    )
    p.add_argument("--rows", type=int, default=32, help="lognormal: rows per step")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="lognormal: the packed path's token budget (0: --micro-batch x (16 + --seq))",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="lognormal: timed steps per path (the fastest)"
    )
    p.add_argument(
        "--path",
        choices=("padded", "packed", "alternate"),
        default="padded",
        help="lognormal, --in-process: one path (memory, gradient) or both in turn (speed)",
    )
    p.add_argument("--grads", default=None, help="lognormal, --in-process: save the gradient")


def run(args: argparse.Namespace) -> dict:
    sigma = lognormal_sigma(args.lengths)
    args.seq = args.seq or (512 if sigma is None else 128)
    if not (args.params or args.hidden or args.layers):
        # fixed: small, so the logits dominate, as in the target; lognormal: the model's
        # body dominates (as in real LLMs), which is what padding costs
        args.hidden, args.layers = (256, 2) if sigma is None else (512, 8)
    path = bench_model(args)
    if sigma is not None:
        from rlalign_ray.bench.train_lengths import run_lengths

        return run_lengths(path, args, sigma)
    if args.in_process:
        results = [measure(path, args)]
    else:
        results = [_in_fresh_process(path, args, chunk) for chunk in sorted({0, args.chunk})]
    print_table("bench train: one learner step (peak RSS growth vs fp32 logits)", results, COLUMNS)
    return {"results": results}


def _in_fresh_process(path: str, args: argparse.Namespace, chunk: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "rlalign_ray.cli", "bench", "train", "--in-process"]
        cmd += ["--model", path, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq)]
        cmd += ["--chunk", str(chunk), "--threads", str(args.threads), "--json", out]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["results"][0]


def lognormal_sigma(text: str) -> float | None:
    """``fixed`` -> None; ``lognormal:S`` -> S."""
    if text == "fixed":
        return None
    kind, _, sigma = text.partition(":")
    try:
        if kind == "lognormal" and float(sigma) > 0:
            return float(sigma)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--lengths {text!r}: write fixed or lognormal:S (S > 0)")


def lengths_arg(text: str) -> str:
    lognormal_sigma(text)  # argparse prints its error
    return text


def bench_learner(path: str, args: argparse.Namespace, rows: int, max_new: int, **learner):
    """A one-rank ``Learner`` on the model at ``path``, set up (DeepSpeed, AdamW), for
    steps of ``rows`` rows; ``learner``: more ``learner.*`` settings."""
    import socket

    from rlalign_ray.config import config_from_dict
    from rlalign_ray.learner.learner import Learner

    cfg = config_from_dict(
        {
            "model": {"path": path},
            "data": {"max_prompt_tokens": PROMPT_TOKENS},
            "rollout": {"prompts_per_step": rows, "n_samples": 1, "max_new_tokens": max_new},
            "reward": {"rewards": [{"path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]},
            "algorithm": {"name": "reinforce_pp", "use_behaviour_logprobs": True},
            "learner": {
                "micro_batch_size": args.micro_batch,
                "logprob_chunk_size": args.chunk,
                "gradient_checkpointing": args.gradient_checkpointing,
                "lr": 1e-6,
                "resources": {"num_cpus": args.threads},
                **learner,
            },
        }
    )
    rank = Learner(cfg, 0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank.setup("127.0.0.1", port)
    return rank


def measure(path: str, args: argparse.Namespace) -> dict:
    """One warm-up step, then the measured step, through a one-rank ``Learner``."""
    import torch

    from rlalign_ray.models.loading import batch_logprobs

    b, t = args.micro_batch, args.seq
    learner = bench_learner(path, args, b, t)
    vocab = learner.engine.module.config.vocab_size
    batch = random_batch(b, t, vocab)
    # old log-probs = the learner's own, so the ratios are 1 and every token has a gradient
    batch.logprobs = batch_logprobs(
        learner.engine.module, batch, 1.0, b, learner.device, args.chunk
    )
    adv = torch.randn(b, generator=torch.Generator().manual_seed(1))
    learner.train_step((batch, None), adv, 0.0, 1)  # warm-up: optimizer state, pools
    with PeakMemory() as mem:
        start = time.perf_counter()
        learner.train_step((batch, None), adv, 0.0, 2)
        elapsed = time.perf_counter() - start
    logits = b * t * vocab * 4
    return {
        "chunk": args.chunk,
        "micro_batch": b,
        "seq": t,
        "vocab": vocab,
        "tokens_per_s": b * (PROMPT_TOKENS + t) / elapsed,
        "peak_gb": gb(mem.growth),
        "logits_gb": gb(logits),
        "ratio_vs_logits": mem.growth / logits,
    }


def random_batch(
    b: int, t: int, vocab: int, prompt_tokens: int = PROMPT_TOKENS, lengths: Any = None
):
    """A batch of ``b`` random prompt + ``t`` response tokens (full masks, zero log-probs);
    ``lengths``: (b,) response tokens per row (at most ``t``; the rest is padding)."""
    import torch

    from rlalign_ray.data.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    lengths = torch.full((b,), t) if lengths is None else torch.as_tensor(lengths)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    return RolloutBatch(
        prompt_ids=torch.randint(4, vocab, (b, prompt_tokens), generator=g),
        prompt_mask=torch.ones(b, prompt_tokens, dtype=torch.long),
        response_ids=torch.randint(4, vocab, (b, t), generator=g) * mask.long(),
        response_len=lengths,
        response_mask=mask,
        logprobs=torch.zeros(b, t),
        version=0,
        group_ids=torch.arange(b),
        prompts=[""] * b,
        completions=[""] * b,
        columns={},
    )
