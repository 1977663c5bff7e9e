"""bench train --lengths lognormal:S: the padded and the packed learner step on the same rows.

Memory, loss and gradient: each path runs in a fresh process (``--in-process --path
padded|packed``): a one-rank ``Learner`` computes the step's loss and gradient first (the
weighted micro-batches of the real update, summed without the optimizer) and saves them,
then runs a warm-up step and a step whose peak RSS growth is measured. Speed: a third fresh
process (``--path alternate``) runs the two paths' steps in turn on one learner, a warm-up
round then ``--repeats`` rounds, and keeps each path's fastest step (the machine may be
shared: alternating exposes both paths to the same load). The parent compares: real
(non-pad) tokens/s, peak memory, the loss difference and the gradient's relative difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from rlalign_ray.bench.common import PeakMemory, gb, print_table
from rlalign_ray.bench.train import PROMPT_TOKENS, bench_learner, random_batch

COLUMNS = ("path", "rows", "real_tokens", "computed_tokens", "micro_batches", "tokens_per_s",
           "step_s", "peak_gb")  # fmt: skip
PATHS = ("padded", "packed")


def draw_lengths(rows: int, seq: int, sigma: float, seed: int = 0) -> Any:
    """(rows,) response lengths: lognormal with median ``seq`` and sigma ``sigma``, rounded,
    between 1 and 8 x ``seq``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, generator=g, dtype=torch.float64)
    return (math.log(seq) + sigma * z).exp().round().clamp(1, 8 * seq).long()


def budget(args: argparse.Namespace) -> int:
    return args.max_tokens or args.micro_batch * (PROMPT_TOKENS + args.seq)


def run_lengths(path: str, args: argparse.Namespace, sigma: float) -> dict:
    if args.in_process:
        if args.path == "alternate":
            return {"results": measure_alternating(path, args, sigma)}
        return {"results": [measure_path(path, args, sigma)]}
    with tempfile.TemporaryDirectory() as tmp:
        results = [_in_fresh_process(path, args, p, tmp)[0] for p in PATHS]
        loss_diff, grad_diff = _compare(*(os.path.join(tmp, f"{p}.pt") for p in PATHS))
        for row, speed in zip(results, _in_fresh_process(path, args, "alternate", tmp)):
            row.update(speed)
    padded, packed = results
    title = (
        f"bench train --lengths lognormal:{sigma:g}: padded vs packed ({args.rows} rows, "
        f"median {args.seq} response tokens, packed budget {budget(args)} tokens)"
    )
    print_table(title, results, COLUMNS)
    out = {
        "padded_tokens_per_s": padded["tokens_per_s"],
        "packed_tokens_per_s": packed["tokens_per_s"],
        "speedup": packed["tokens_per_s"] / padded["tokens_per_s"],
        "padded_peak_gb": padded["peak_gb"],
        "packed_peak_gb": packed["peak_gb"],
        "peak_ratio": packed["peak_gb"] / max(padded["peak_gb"], 1e-9),
        "loss_abs_diff": loss_diff,
        "grad_rel_diff": grad_diff,
    }
    print(
        f"\npacked / padded: {out['speedup']:.2f}x tokens/s, {out['peak_ratio']:.2f}x peak "
        f"memory; |loss difference| {loss_diff:.2g}, gradient relative difference "
        f"{grad_diff:.2g}"
    )
    return {"results": results, **out}


def _in_fresh_process(path: str, args: argparse.Namespace, which: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"{which}.json")
    cmd = [sys.executable, "-m", "rlalign_ray.cli", "bench", "train", "--in-process"]
    cmd += ["--model", path, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq)]
    cmd += ["--chunk", str(args.chunk), "--threads", str(args.threads), "--json", out]
    cmd += ["--lengths", args.lengths, "--rows", str(args.rows), "--max-tokens", str(budget(args))]
    cmd += ["--path", which, "--grads", os.path.join(tmp, f"{which}.pt")]
    cmd += ["--repeats", str(args.repeats)]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["results"]


def _compare(padded: str, packed: str) -> tuple[float, float]:
    """|loss difference| and ||g_packed - g_padded|| / ||g_padded|| over all parameters."""
    import torch

    a, b = torch.load(padded, weights_only=True), torch.load(packed, weights_only=True)
    diff = sum(float((a["grads"][k] - b["grads"][k]).double().square().sum()) for k in a["grads"])
    norm = sum(float(g.double().square().sum()) for g in a["grads"].values())
    return abs(a["loss"] - b["loss"]), math.sqrt(diff / max(norm, 1e-300))


def _setup(path: str, args: argparse.Namespace, sigma: float, packing: bool):
    """A one-rank learner (packing with the budget, or padded) and the step's rows, whose
    old log-probs are the learner's own (ratios 1), computed the same (padded) way for both
    paths; and one advantage per row."""
    import torch

    from rlalign_ray.models.loading import batch_logprobs

    lengths = draw_lengths(args.rows, args.seq, sigma)
    widest = int(lengths.max())
    settings = {"packing": True, "max_tokens_per_micro_batch": budget(args)} if packing else {}
    learner = bench_learner(path, args, args.rows, widest, **settings)
    if packing and not learner.packing:
        raise RuntimeError(f"{path}: this model cannot pack exactly (see the warning above)")
    vocab = learner.engine.module.config.vocab_size
    batch = random_batch(args.rows, widest, vocab, lengths=lengths)
    batch.logprobs = batch_logprobs(
        learner.engine.module, batch, 1.0, args.micro_batch, learner.device, args.chunk
    )
    return learner, batch, torch.randn(args.rows, generator=torch.Generator().manual_seed(1))


def measure_path(path: str, args: argparse.Namespace, sigma: float) -> dict:
    """One path (``args.path``): the loss and gradient (saved to ``args.grads``), then a
    warm-up step and the step whose peak memory growth is measured."""
    from rlalign_ray.data.packing import row_tokens

    learner, batch, adv = _setup(path, args, sigma, args.path == "packed")
    micro = _save_loss_and_grad(learner, batch, adv, args.grads)
    learner.train_step((batch, None), adv, 0.0, 1)  # warm-up: optimizer state, pools
    with PeakMemory() as mem:
        learner.train_step((batch, None), adv, 0.0, 2)
    return {
        "path": args.path,
        "rows": args.rows,
        "real_tokens": int(row_tokens(batch).sum()),
        "computed_tokens": sum(_computed_tokens(learner, batch.select(r).trimmed()) for r in micro),
        "micro_batches": len(micro),
        "peak_gb": gb(mem.growth),
    }


def measure_alternating(path: str, args: argparse.Namespace, sigma: float) -> list[dict]:
    """Both paths' steps in turn on one learner (a warm-up round, then ``args.repeats``
    rounds): each path's fastest step, as real tokens/s."""
    from rlalign_ray.data.packing import row_tokens

    learner, batch, adv = _setup(path, args, sigma, packing=True)
    real = int(row_tokens(batch).sum())
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for round_ in range(args.repeats + 1):
        for which in PATHS:
            learner.packing = which == "packed"
            learner.role.max_tokens_per_micro_batch = budget(args) if learner.packing else 0
            start = time.perf_counter()
            learner.train_step((batch, None), adv, 0.0, 1 + round_)
            if round_:
                times[which].append(time.perf_counter() - start)
    return [
        {"tokens_per_s": real / min(times[p]), "step_s": min(times[p]), "steps_s": times[p]}
        for p in PATHS
    ]


def _computed_tokens(learner: Any, mb: Any) -> int:
    """Tokens the model runs on for the micro-batch ``mb``: padded, or packed (bin tails)."""
    from rlalign_ray.models.loading import pack_for

    if learner.packing:
        return pack_for(learner.engine.module, mb).tokens
    return int(mb.prompt_ids.numel() + mb.response_ids.numel())


def _save_loss_and_grad(learner: Any, batch: Any, adv: Any, path: str | None) -> list[Any]:
    """The step's loss and gradient as the update computes them (its weighted
    micro-batches, backward through the model alone), saved to ``path``; the gradients are
    then dropped. Returns the micro-batches' rows."""
    import torch

    learner.engine.train()
    rows = torch.arange(len(batch))
    micro = learner.weighted_micro_batches(batch, rows)
    norm = learner.world_size * learner.grad_accumulation  # what loss_scale multiplied in
    loss = 0.0
    for i, (r, scale) in enumerate(micro):
        part, _, _ = learner.micro_loss(batch, r, batch.logprobs, adv, None, 0.0, i)
        (part * scale / norm).backward()
        loss += float(part.detach()) * scale / norm
    module = learner.engine.module
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    if path:
        torch.save({"loss": loss, "grads": grads}, path)
    module.zero_grad(set_to_none=True)
    return [r for r, _ in micro]
