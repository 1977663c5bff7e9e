"""``rlalign-ray bench``: speed and memory of the paths whose cost grows with scale, each
printed as a ratio against a limit measured in the same run.

    rlalign-ray bench weights  --params 100M --receivers 1,4 [--transport ...]
    rlalign-ray bench generate --backend hf,vllm --batch 64 --max-new-tokens 512 [--in-process]
    rlalign-ray bench train    --micro-batch 8 --seq 512 [--in-process]
    rlalign-ray bench train    --lengths lognormal:1.0 [--rows 32 --seq 128 --max-tokens N]
    rlalign-ray bench step     CONFIG [overrides]
    rlalign-ray bench pipeline CONFIG [overrides] --max-staleness 0,1,2
    rlalign-ray bench pipeline --simulate gen=0.2,train=0.3[,tail=lognormal:1.0] [--max-staleness 0,1]
    rlalign-ray bench scale    --simulate --actors 64,128,256
    rlalign-ray bench soak     CONFIG [overrides] --steps 500

Every subcommand prints a table and, with ``--json FILE``, writes its results. Models are
random-init Llamas built locally (``--params 100M`` or ``--hidden/--layers/--vocab``) or
``--model PATH``. Benchmarks use the same public classes as training; ``--simulate`` runs
the real Trainer with simulated actors (``bench/simulated.py``, a harness whose calls sleep
for given times) to measure the orchestration alone.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "weights": "rlalign_ray.bench.weights",
    "generate": "rlalign_ray.bench.generate",
    "train": "rlalign_ray.bench.train",
    "step": "rlalign_ray.bench.step",
    "pipeline": "rlalign_ray.bench.pipeline",
    "scale": "rlalign_ray.bench.scale",
    "soak": "rlalign_ray.bench.soak",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against limits measured in the same run")
    which = p.add_subparsers(dest="bench", required=True)
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        q = which.add_parser(name, help=mod.__doc__.strip().split("\n")[0])
        q.add_argument("--json", default=None, help="also write the results to this file")
        mod.add_arguments(q)


def run(args: argparse.Namespace) -> int:
    from rlalign_ray.bench.common import write_json

    mod = importlib.import_module(SUBCOMMANDS[args.bench])
    result = mod.run(args)
    if args.json:
        write_json(args.json, result)
    return 0
