"""The phase breakdown of real training steps and the driver's overhead.

    rlalign-ray bench step configs/demo_cpu.yaml [key=value ...] [--steps 20]

Runs ``--steps`` real steps of CONFIG (no evaluation, no checkpoints, a throw-away output
folder unless one is given) and reports the median seconds of each phase the driver logs
(``time/generate_s``, ``time/reward_s``, ``time/train_s``, ``time/sync_s``) and the
overhead: the share of the step spent in none of them (the driver's own work, Ray calls,
advantages, logging).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from rlalign_ray.bench.common import bench_overrides, medians, print_table, train_rows

PHASES = ("time/generate_s", "time/reward_s", "time/train_s", "time/sync_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.backend=vllm")
    p.add_argument("--steps", type=int, default=20, help="training steps to run")
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rlalign_ray.config import load_config

    with tempfile.TemporaryDirectory(prefix="rlalign-bench-step-") as tmp:
        overrides = bench_overrides(tmp, args.steps) + list(args.overrides)
        rows = train_rows(load_config(args.config, overrides), skip=args.skip)
    med = medians(rows, (*PHASES, "time/step_s"))
    step = med["time/step_s"]
    overhead = step - sum(med[k] for k in PHASES)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "steps_measured": len(rows),
        "step_s": step,
        **{k.removeprefix("time/"): v for k, v in med.items() if k in PHASES},
        "overhead_s": overhead,
        "overhead_fraction": overhead / step if step else 0.0,
    }
    table = [{"phase": k.removeprefix("time/"), "median_s": med[k], "share": med[k] / step}
             for k in PHASES]  # fmt: skip
    table.append({"phase": "overhead", "median_s": overhead, "share": overhead / step})
    table.append({"phase": "step", "median_s": step, "share": 1.0})
    print_table(
        f"step: {args.config} {' '.join(args.overrides)}", table, ["phase", "median_s", "share"]
    )
    return result
