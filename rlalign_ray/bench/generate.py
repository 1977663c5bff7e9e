"""Generation speed (a generator actor vs the same generator in-process) and memory growth.

    rlalign-ray bench generate --backend hf,vllm --batch 64 --max-new-tokens 64,512 --ignore-eos

For each backend and each ``--max-new-tokens``, a fresh subprocess runs the generator
in-process (``--in-process``: no Ray, so ``/usr/bin/time -v`` sees only it) and reports
tokens/s and its peak memory growth during ``generate``; then the same ``Generator`` class
runs as a Ray actor with the same CPUs and the driver times the call. Ratios printed:
``actor_vs_in_process`` (tokens/s; the target is >= 0.95) and, between the shortest and the
longest length, the peak-memory growth as a share of what one fp32 (N, T, V) logits tensor
would grow by (the target is <= 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from rlalign_ray.bench.common import (
    PeakMemory,
    add_model_arguments,
    bench_model,
    gb,
    parse_list,
    print_table,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, default_params="10M")
    p.add_argument("--backend", default="hf", help="comma-separated: hf, vllm")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    p.add_argument("--max-new-tokens", default="64,512", help="comma-separated response lengths")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="always generate the full length")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeat", type=int, default=2, help="timed calls (best is kept)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="one configuration in this process, no Ray (prints its JSON result)",
    )
    p.add_argument("--skip-actor", action="store_true", help="only the in-process runs")


def _generator(args: argparse.Namespace, backend: str, max_new: int, model: str):
    """The real generator, configured like a training run's (one micro-batch)."""
    from rlalign_ray.config import ModelConfig, Resources, RolloutConfig, VLLMConfig

    rollout = RolloutConfig(
        backend=backend,
        max_new_tokens=max_new,
        ignore_eos=args.ignore_eos,
        micro_batch_size=args.batch,
        resources=Resources(num_cpus=args.threads),
        vllm=VLLMConfig(max_model_len=args.prompt_tokens + max_new + 8),
    )
    return ModelConfig(path=model), rollout


def _prompts(args: argparse.Namespace) -> list[Any]:
    """``--batch`` text prompts of ``--prompt-tokens`` characters (one token each)."""
    import random

    from rlalign_ray.data.batch import PromptItem

    rng = random.Random(0)
    body = args.prompt_tokens - 1  # the tokenizer adds BOS
    return [
        PromptItem(i, "".join(rng.choice("0123456789+=") for _ in range(body)))
        for i in range(args.batch)
    ]


def _timed(call, repeat: int) -> tuple[float, int]:
    """Best seconds over ``repeat`` calls after one warm-up, and the tokens generated."""
    batch = call()  # warm-up: allocator pools, vLLM's first-call compilation
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        batch = call()
        best = min(best, time.perf_counter() - t)
    return best, int(batch.response_len.sum())


def run_in_process(args: argparse.Namespace, backend: str, max_new: int) -> dict[str, Any]:
    from rlalign_ray.rollout.generator import Generator

    model_cfg, rollout = _generator(args, backend, max_new, bench_model(args))
    gen = Generator(model_cfg, rollout, seed=0, max_prompt_tokens=args.prompt_tokens)
    items = _prompts(args)
    gen.generate(items[:2], 1)  # first call outside the measurement
    with PeakMemory() as mem:
        seconds, tokens = _timed(lambda: gen.generate(items, 1), args.repeat)
    vocab = len(gen.tok)
    return {
        "backend": backend,
        "max_new_tokens": max_new,
        "tokens": tokens,
        "in_process_tok_s": tokens / seconds,
        "peak_growth_gb": gb(mem.growth),
        "logits_gb": gb(args.batch * max_new * vocab * 4),
    }


def run_actor(args: argparse.Namespace, backend: str, max_new: int) -> float:
    """Tokens/s of the same generator as a Ray actor, timed by the driver."""
    import ray

    from rlalign_ray.rollout.generator import Generator

    model_cfg, rollout = _generator(args, backend, max_new, bench_model(args))
    actor = (
        ray.remote(Generator)
        .options(num_cpus=args.threads)
        .remote(model_cfg, rollout, 0, 0, args.prompt_tokens)
    )
    items = _prompts(args)
    ray.get(actor.generate.remote(items[:2], 1))
    seconds, tokens = _timed(lambda: ray.get(actor.generate.remote(items, 1)), args.repeat)
    ray.kill(actor)
    return tokens / seconds


def _subprocess(args: argparse.Namespace, backend: str, max_new: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "rlalign_ray.cli", "bench", "generate", "--in-process",
        "--backend", backend, "--max-new-tokens", str(max_new), "--batch", str(args.batch),
        "--prompt-tokens", str(args.prompt_tokens), "--threads", str(args.threads),
        "--repeat", str(args.repeat), "--vocab", str(args.vocab), "--cache-dir", args.cache_dir,
    ]  # fmt: skip
    cmd += ["--ignore-eos"] if args.ignore_eos else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--hidden", str(args.hidden), "--layers", str(args.layers)] if args.hidden else []
    cmd += ["--params", args.params] if args.params and not args.hidden else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench generate --in-process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    backends = parse_list(args.backend)
    lengths = parse_list(args.max_new_tokens, int)
    bench_model(args)  # build the model once, before the subprocesses race for it
    if args.in_process:
        result = run_in_process(args, backends[0], lengths[0])
        print(json.dumps(result))
        return result
    rows = [_subprocess(args, b, t) for b in backends for t in lengths]
    if not args.skip_actor:
        from rlalign_ray.config import RunConfig
        from rlalign_ray.runtime.cluster import connect

        started = connect(RunConfig(), args.threads)
        try:
            for r in rows:
                r["actor_tok_s"] = run_actor(args, r["backend"], r["max_new_tokens"])
                r["actor_vs_in_process"] = r["actor_tok_s"] / r["in_process_tok_s"]
        finally:
            if started:
                import ray

                ray.shutdown()
    growth = {}
    for b in backends:
        mine = sorted((r for r in rows if r["backend"] == b), key=lambda r: r["max_new_tokens"])
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            logits_growth = hi["logits_gb"] - lo["logits_gb"]
            growth[b] = {
                "from_tokens": lo["max_new_tokens"],
                "to_tokens": hi["max_new_tokens"],
                "peak_growth_gb": hi["peak_growth_gb"] - lo["peak_growth_gb"],
                "logits_growth_gb": logits_growth,
                "ratio_vs_logits": (hi["peak_growth_gb"] - lo["peak_growth_gb"]) / logits_growth,
            }
    cols = ["backend", "max_new_tokens", "in_process_tok_s", "actor_tok_s"]
    cols += ["actor_vs_in_process", "peak_growth_gb", "logits_gb"]
    print_table(f"generate: batch {args.batch}, ignore_eos={args.ignore_eos}", rows, cols)
    for b, g in growth.items():
        print(
            f"{b}: peak memory grows {g['peak_growth_gb']:.3f} GB from {g['from_tokens']} to "
            f"{g['to_tokens']} new tokens = {g['ratio_vs_logits']:.3f}x the growth of an fp32 "
            f"(N, T, V) logits tensor ({g['logits_growth_gb']:.2f} GB); target <= 0.10"
        )
    return {"results": rows, "memory_growth": growth}
