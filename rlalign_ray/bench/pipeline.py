"""Pipelined training: step time for each trainer.max_staleness against max(generate, train).

    rlalign-ray bench pipeline CONFIG [overrides] --max-staleness 0,1,2
    rlalign-ray bench pipeline --simulate gen=0.2,train=0.3[,tail=lognormal:1.0] --max-staleness 0,1
    rlalign-ray bench pipeline --simulate gen=0.2,train=0.3,tail=lognormal:1.5 --max-staleness 1 \
        --inflight-updates

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

``--inflight-updates`` runs every k >= 1 a second time with ``rollout.inflight_updates``
(a new version is loaded between two decode steps of the chunk in progress instead of
after it; simulated generators sleep step by step and let the load in between), and
reports its per-token ``rollout/version_lag_mean`` and ``rollout/inflight_loads`` beside
every run's per-row ``rollout/staleness_mean`` (a row's oldest token).
Target: with in-flight updates, k = 1 within 1.05x the ideal.
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
LAG = ("rollout/staleness_mean",)  # per row (its oldest token): every pipelined run
INFLIGHT = ("rollout/version_lag_mean", "rollout/inflight_loads")  # per token, in-flight
RATIO_TARGET = 1.1  # k = 1: step time <= 1.1x max(generate, train)
INFLIGHT_TARGET = 1.05  # k = 1 with in-flight updates: step time <= 1.05x the ideal
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
    p.add_argument(
        "--inflight-updates",
        action="store_true",
        help="also run every k >= 1 with rollout.inflight_updates (loads mid-chunk)",
    )
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
    variants = [(k, False) for k in ks]
    if args.inflight_updates:
        variants += [(k, True) for k in ks if k >= 1]
    runs, static = _simulated(args, variants) if args.simulate else (_real(args, variants), None)
    base = runs[(0, False)]
    ideal = max(base["time/generate_s"], base["time/train_s"])
    out: dict[str, Any] = {
        "results": [
            {
                "max_staleness": k,
                "inflight_updates": inflight,
                "step_s": runs[k, inflight]["time/step_s"],
                "ideal_s": ideal,
                "ratio": runs[k, inflight]["time/step_s"] / ideal,
            }
            for k, inflight in variants
        ],
        "ideal": {"generate_s": base["time/generate_s"], "train_s": base["time/train_s"]},
        "runs": {_label(k, inflight): runs[k, inflight] for k, inflight in variants},
        "source": f"--simulate {args.simulate}"
        if args.simulate
        else " ".join([args.config, *args.overrides]),
    }
    if static is not None:
        out["longtail"] = {"static_step_s": static, "pull_step_s": base["time/step_s"]}
    report(args, out)
    return out


def _label(k: int, inflight: bool) -> str:
    """A run's key in the JSON's ``runs``: "1", or "1+inflight"."""
    return f"{k}+inflight" if inflight else str(k)


def report(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """The table, and each target met or missed."""
    table = []
    for r in out["results"]:
        run = out["runs"][_label(r["max_staleness"], r["inflight_updates"])]
        table.append({**r, **{p.split("/")[1]: v for p, v in run.items()}})
    columns = ["max_staleness", "inflight_updates", "step_s", "ideal_s", "ratio", "generate_s"]
    columns += ["train_s", "driver_cpu_s"]
    if args.inflight_updates:
        columns += ["staleness_mean", "version_lag_mean", "inflight_loads"]
    print_table(
        f"pipeline: {out['source']}; median of steps > {args.skip}; ideal = max(generate, "
        "train) of the k=0 run",
        table,
        columns,
    )
    for r in out["results"]:
        if r["max_staleness"] != 1:
            continue
        target = INFLIGHT_TARGET if r["inflight_updates"] else RATIO_TARGET
        met = "met" if r["ratio"] <= target else "MISSED"
        what = "k=1 with in-flight updates" if r["inflight_updates"] else "k=1"
        print(f"{what}: {r['ratio']:.3f}x max(generate, train); target <= {target} ({met})")
    if "longtail" in out:
        static, pull = out["longtail"]["static_step_s"], out["longtail"]["pull_step_s"]
        cut = 1 - pull / static
        met = "met" if cut >= CUT_TARGET else "MISSED"
        print(
            f"long tail, k=0: static split {static:.3f} s/step, pulled chunks of "
            f"{args.chunk_size} prompts {pull:.3f} s/step: {cut:.1%} shorter; "
            f"target >= {CUT_TARGET:.0%} ({met})"
        )


def _real(args: argparse.Namespace, variants: list[tuple[int, bool]]) -> dict[tuple, dict]:
    """Median phases of real runs of CONFIG, one per (k, in-flight updates)."""
    from rlalign_ray.config import load_config

    runs = {}
    for k, inflight in variants:
        with tempfile.TemporaryDirectory(prefix="rlalign-bench-pipeline-") as tmp:
            overrides = [*bench_overrides(tmp, args.steps), *args.overrides]
            overrides += [f"trainer.max_staleness={k}", f"rollout.inflight_updates={inflight}"]
            cfg = load_config(args.config, overrides)
            runs[k, inflight] = _medians(train_rows(cfg, skip=args.skip), inflight)
    return runs


def _medians(rows: list[dict[str, Any]], inflight: bool) -> dict[str, float]:
    return medians(rows, PHASES + LAG + (INFLIGHT if inflight else ()))


def _simulated(
    args: argparse.Namespace, variants: list[tuple[int, bool]]
) -> tuple[dict[tuple, dict], float | None]:
    """Median phases of simulated runs, one per (k, in-flight updates) with pulled chunks,
    on one Ray instance; with a tail also the static split's median step time (k = 0)."""
    import ray

    from rlalign_ray.bench.simulated import Workload
    from rlalign_ray.config import RunConfig
    from rlalign_ray.runtime.cluster import connect

    tail = Workload.parse(args.simulate, 1, 1).tail_sigma > 0  # also checks SPEC before Ray
    started = connect(RunConfig(), 1.0)
    try:
        runs = {(k, f): _simulated_run(args, k, args.chunk_size, f) for k, f in variants}
        static = _simulated_run(args, 0, 0)["time/step_s"] if tail else None
    finally:
        if started:
            ray.shutdown()
    return runs, static


def _simulated_run(
    args: argparse.Namespace, k: int, chunk_size: int, inflight: bool = False
) -> dict[str, float]:
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
                f"rollout.inflight_updates={inflight}",
            ],
        )
        work = Workload.parse(args.simulate, cfg.batch_size, cfg.rollout.num_actors)
        return _medians(train_rows(cfg, simulated_topology(cfg, work), args.skip), inflight)
