"""The ``rlalign-ray`` command.

rlalign-ray train CONFIG [key.path=value ...]
rlalign-ray check-config CONFIG [key.path=value ...] [--resources]
rlalign-ray make-tiny-model DIR [--arch llama|qwen2] [--warmup arith|none] [--params 100M]
rlalign-ray bench weights|generate|train|step|pipeline|scale ...
rlalign-ray report RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rlalign_ray.errors import RlalignError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when the help is
    printed (train's lists every config key, whose options are read from the algorithms'
    registries: it imports torch, which other commands need not)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except RlalignError as e:
        print(f"rlalign-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlalign-ray: interrupted", file=sys.stderr)
        return 130


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; dotted overrides may also follow an option (``--resources k=v``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "overrides", None) is not None:
        args.overrides += [x for x in extra if not x.startswith("-")]
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: subcommands, their arguments and help (the CLI reference in
    ``docs/reference/cli.md`` is generated from it)."""
    parser = argparse.ArgumentParser(prog="rlalign-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from rlalign_ray.config_doc import config_help

    p = sub.add_parser(
        "train",
        help="train a policy (starts a local Ray instance if none is given)",
        epilog=config_help,  # every config key: type, default, doc line
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML run config, e.g. configs/demo_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=20")
    p = sub.add_parser(
        "check-config",
        help="validate a config and print the resolved tree (--resources: what it needs)",
        description="Validate a config and print the resolved tree. With --resources, print "
        "instead the CPUs, GPUs and memory each role and node type needs and whether the "
        "connected cluster (run.ray_address / RAY_ADDRESS) or this machine has them; exit "
        "status 0 when it fits, 2 when it does not.",
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    p.add_argument(
        "--resources", action="store_true", help="needs per role vs. the cluster or this machine"
    )
    p = sub.add_parser("make-tiny-model", help="build a small model and tokenizer locally")
    p.add_argument("dir", help="folder to write the model and tokenizer to")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"], help="architecture")
    p.add_argument(
        "--warmup",
        default=None,
        choices=["arith", "none"],
        help="also run a short supervised warm-up on a task (none: random init)",
    )
    p.add_argument("--params", default=None, help="size, e.g. 100M (a random-init Llama)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (with --params)")
    p = sub.add_parser(
        "report", help="plot a run's metrics.jsonl into RUN_DIR/report.png and report.html"
    )
    p.add_argument("run_dir", help="a run's trainer.output_dir (holding metrics.jsonl)")
    from rlalign_ray.bench import add_parser as add_bench

    add_bench(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from rlalign_ray.config import load_config
    from rlalign_ray.trainers import Trainer

    cfg = load_config(args.config, args.overrides)
    final = Trainer(cfg).fit()
    keys = [k for k in ("eval/reward_mean", "train/reward_mean") if k in final]
    summary = ", ".join(f"{k}={final[k]:.3f}" for k in keys)
    print(
        f"rlalign-ray: done. {summary}. Metrics: {cfg.trainer.output_dir}/metrics.jsonl; "
        f"policy: {cfg.trainer.output_dir}/final"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    from rlalign_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.resources:
        return _check_resources(cfg, args.config)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _check_resources(cfg, name: str) -> int:
    """The needs table and verdict against the cluster at run.ray_address / RAY_ADDRESS
    (attached for a moment), else this machine; 0 when it fits, 2 when it does not."""
    from rlalign_ray.runtime import resources

    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        from rlalign_ray.runtime.cluster import attach

        attach(address, "run.ray_address" if cfg.run.ray_address else "RAY_ADDRESS")
        try:
            nodes = resources.cluster_nodes()
        finally:
            ray.shutdown()
    else:
        nodes = [resources.this_machine()]
    text, fits = resources.report(cfg, name, nodes, local=not address)
    print(text)
    return 0 if fits else 2


def _make_tiny(args: argparse.Namespace) -> int:
    if args.params:
        from rlalign_ray.bench.common import parse_size, shape_for_params
        from rlalign_ray.models.tiny import build_sized_model

        if args.warmup not in (None, "none"):
            print(
                "rlalign-ray: error: --params builds a random-init model; use --warmup none",
                file=sys.stderr,
            )
            return 2
        hidden, layers = shape_for_params(parse_size(args.params), args.vocab)
        path = build_sized_model(args.dir, hidden=hidden, layers=layers, vocab=args.vocab)
        print(
            f"rlalign-ray: llama (hidden {hidden}, {layers} layers, vocab {args.vocab}) written to {path}"
        )
        return 0
    from rlalign_ray.models.tiny import make_tiny_model

    warmup = None if args.warmup == "none" else args.warmup
    path = make_tiny_model(args.dir, arch=args.arch, warmup_task=warmup)
    print(f"rlalign-ray: tiny {args.arch} model written to {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from rlalign_ray.report import write_report

    png, html = write_report(args.run_dir)
    print(f"rlalign-ray: wrote {png} and {html}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rlalign_ray.bench import run

    return run(args)


COMMANDS = {
    "train": _train,
    "check-config": _check,
    "make-tiny-model": _make_tiny,
    "bench": _bench,
    "report": _report,
}

if __name__ == "__main__":
    sys.exit(main())
