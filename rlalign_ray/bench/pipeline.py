"""Pipelined training: step time for each trainer.max_staleness against max(generate, train).

    rlalign-ray bench pipeline CONFIG [overrides] --max-staleness 0,1,2
    rlalign-ray bench pipeline --simulate gen=0.2,train=0.3[,tail=lognormal:1.0] --max-staleness 0,1

Runs ``--steps`` steps of the real ``Trainer`` for each k in ``--max-staleness`` (k = 0
always runs) and reports the median step time against the ideal ``max(generate, train)``:
the median ``time/generate_s`` and ``time/train_s`` of the k = 0 run, where generation and
training take turns and neither slows the other. With CONFIG the steps are real (no
evaluation, no checkpoints, a throw-away output folder). With ``--simulate`` every actor
is simulated (``bench/simulated.py``: calls sleep for the given times, so the measurement
is the orchestration alone, free of CPU contention) in pulled chunks of ``--chunk-size``
prompts; ``gen`` is the step's generation time with the batch spread evenly and no length
tail, ``train`` the time of one update. With a ``tail``, a static split (one chunk per
generator, ``rollout.chunk_size=0``) runs too, at k = 0, against the pulled chunks.
Targets: k = 1 within 1.1x the ideal; pulled chunks >= 25% faster than a static split.
With a long tail a pipelined run can beat the ideal: a generator done with its share of a
step's chunks goes on to the next step's instead of waiting for the step's straggler.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from rlalign_ray.bench.common import (
    bench_overrides,
    medians,
    parse_list,
    print_table,
    train_rows,
)

PHASES = ("time/step_s", "time/generate_s", "time/train_s", "time/driver_cpu_s")
RATIO_TARGET = 1.1  # k = 1: step time <= 1.1x max(generate, train)
CUT_TARGET = 0.25  # long tail: pulled chunks cut the static split's step time by >= 25%


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML run config (real steps; else --simulate)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.chunk_size=2")
    p.add_argument(
        "--simulate",
        default=None,
        metavar="SPEC",
        help="simulated actors: gen=S,train=S[,tail=lognormal:SIGMA][,reward=S][,ref=S]",
    )
    p.add_argument("--max-staleness", default="0,1", help="comma-separated k values")
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    sim = p.add_argument_group("simulated runs")
    sim.add_argument("--generators", type=int, default=4, help="simulated generator actors")
    sim.add_argument("--rewards", type=int, default=2, help="simulated reward actors")
    sim.add_argument("--prompts", type=int, default=32, help="prompts per step")
    sim.add_argument("--n-samples", type=int, default=8, help="samples per prompt")
    sim.add_argument("--chunk-size", type=int, default=1, help="prompts per pulled chunk")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.config) == bool(args.simulate):
        from rlalign_ray.errors import ConfigError

        raise ConfigError(["bench pipeline: give a CONFIG or --simulate SPEC (one of them)"])
    ks = sorted(set(parse_list(args.max_staleness, int)) | {0})
    runs, static = _simulated(args, ks) if args.simulate else (_real(args, ks), None)
    base = runs[0]
    ideal = max(base["time/generate_s"], base["time/train_s"])
    out: dict[str, Any] = {
        "results": [
            {
                "max_staleness": k,
                "step_s": runs[k]["time/step_s"],
                "ideal_s": ideal,
                "ratio": runs[k]["time/step_s"] / ideal,
            }
            for k in ks
        ],
        "ideal": {"generate_s": base["time/generate_s"], "train_s": base["time/train_s"]},
        "runs": {str(k): runs[k] for k in ks},
        "source": f"--simulate {args.simulate}"
        if args.simulate
        else " ".join([args.config, *args.overrides]),
    }
    if static is not None:
        out["longtail"] = {"static_step_s": static, "pull_step_s": base["time/step_s"]}
    report(args, out)
    return out


def report(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The table, and each target met or missed."""
    table = [
        {**r, **{p.removeprefix("time/"): out["runs"][str(r["max_staleness"])][p] for p in PHASES}}
        for r in out["results"]
    ]
    print_table(
        f"pipeline: {out['source']}; median of steps > {args.skip}; ideal = max(generate, "
        "train) of the k=0 run",
        table,
        ["max_staleness", "step_s", "ideal_s", "ratio", "generate_s", "train_s", "driver_cpu_s"],
    )
    for r in out["results"]:
        if r["max_staleness"] == 1:
            met = "met" if r["ratio"] <= RATIO_TARGET else "MISSED"
            print(f"k=1: {r['ratio']:.3f}x max(generate, train); target <= {RATIO_TARGET} ({met})")
    if "longtail" in out:
        static, pull = out["longtail"]["static_step_s"], out["longtail"]["pull_step_s"]
        cut = 1 - pull / static
        met = "met" if cut >= CUT_TARGET else "MISSED"
        print(
            f"long tail, k=0: static split {static:.3f} s/step, pulled chunks of "
            f"{args.chunk_size} prompts {pull:.3f} s/step: {cut:.1%} shorter; "
            f"target >= {CUT_TARGET:.0%} ({met})"
        )


def _real(args: argparse.Namespace, ks: list[int]) -> dict[int, dict[str, float]]:
    """Median phases of real runs of CONFIG, one per k."""
    from rlalign_ray.config import load_config

    runs = {}
    for k in ks:
        with tempfile.TemporaryDirectory(prefix="rlalign-bench-pipeline-") as tmp:
            overrides = [*bench_overrides(tmp, args.steps), *args.overrides]
            cfg = load_config(args.config, [*overrides, f"trainer.max_staleness={k}"])
            runs[k] = medians(train_rows(cfg, skip=args.skip), PHASES)
    return runs


def _simulated(args: argparse.Namespace, ks: list[int]) -> tuple[dict[int, dict], float | None]:
    """Median phases of simulated runs, one per k with pulled chunks, on one Ray instance;
    with a tail also the static split's median step time (k = 0)."""
    import ray

    from rlalign_ray.bench.simulated import Workload
    from rlalign_ray.config import RunConfig
    from rlalign_ray.runtime.cluster import connect

    tail = Workload.parse(args.simulate, 1, 1).tail_sigma > 0  # also checks SPEC before Ray
    started = connect(RunConfig(), 1.0)
    try:
        runs = {k: _simulated_run(args, k, args.chunk_size) for k in ks}
        static = _simulated_run(args, 0, 0)["time/step_s"] if tail else None
    finally:
        if started:
            ray.shutdown()
    return runs, static


def _simulated_run(args: argparse.Namespace, k: int, chunk_size: int) -> dict[str, float]:
    from rlalign_ray.bench.simulated import Workload, simulated_config, simulated_topology

    with tempfile.TemporaryDirectory(prefix="rlalign-bench-pipeline-") as tmp:
        cfg = simulated_config(
            tmp,
            args.steps,
            [
                f"rollout.prompts_per_step={args.prompts}",
                f"rollout.n_samples={args.n_samples}",
                f"rollout.num_actors={args.generators}",
                f"rollout.chunk_size={chunk_size}",
                f"reward.num_actors={args.rewards}",
                f"learner.micro_batch_size={args.n_samples}",
                "algorithm.kl_coef=0.001",  # a reference pool too
                f"trainer.max_staleness={k}",
            ],
        )
        work = Workload.parse(args.simulate, cfg.batch_size, cfg.rollout.num_actors)
        return medians(train_rows(cfg, simulated_topology(cfg, work), args.skip), PHASES)
