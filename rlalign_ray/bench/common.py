"""Shared pieces of the benchmarks: models built to a size, tables, JSON, peak memory."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any


def add_model_arguments(p: argparse.ArgumentParser, default_params: str = "") -> None:
    p.add_argument("--model", default=None, help="a model folder (else one is built locally)")
    p.add_argument(
        "--params",
        default=default_params,
        help="build a random-init Llama of about this size, e.g. 100M",
    )
    p.add_argument("--hidden", type=int, default=0, help="hidden size (instead of --params)")
    p.add_argument("--layers", type=int, default=0, help="layers (instead of --params)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument(
        "--cache-dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "rlalign_ray", "bench"),
        help="where built models are kept between runs",
    )


def parse_size(text: str) -> int:
    """'100M' -> 100_000_000; '1.5B', '600K', or a plain number."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: write a size like 100M or 1.5B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def shape_for_params(params: int, vocab: int) -> tuple[int, int]:
    """(hidden, layers) of a Llama with tied embeddings of about ``params`` parameters
    (12 h^2 per layer plus the embedding), shaped like common models: about one layer per
    64 hidden units (768 x 12 at 100M with a 32k vocabulary)."""
    best = (float("inf"), 128, 1)
    for hidden in range(64, 8193, 64):
        layers = round((params - vocab * hidden) / (12 * hidden * hidden))
        if layers >= 1:
            best = min(best, (abs(layers - hidden / 64), hidden, layers))
    return best[1], best[2]


def bench_model(args: argparse.Namespace) -> str:
    """The folder of the model to benchmark: ``--model``, or a random-init Llama built
    (once, cached) to ``--params`` or ``--hidden/--layers`` with ``--vocab``."""
    if args.model:
        return args.model
    from rlalign_ray.models.tiny import build_sized_model

    if args.hidden and args.layers:
        hidden, layers = args.hidden, args.layers
    else:
        hidden, layers = shape_for_params(parse_size(args.params or "100M"), args.vocab)
    path = os.path.join(args.cache_dir, f"llama-h{hidden}-l{layers}-v{args.vocab}")
    return build_sized_model(path, hidden=hidden, layers=layers, vocab=args.vocab)


def bench_overrides(output_dir: str, steps: int) -> list[str]:
    """Overrides for timed training runs: ``steps`` steps, no evaluation, no checkpoints,
    no TensorBoard or progress bar, metrics written to ``output_dir``."""
    return [
        f"trainer.steps={steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "data.eval=null",
        f"trainer.output_dir={output_dir}",
    ]


def train_rows(
    cfg: Any, topology: Any = None, skip: int = 0, trainer: type | None = None
) -> list[dict[str, Any]]:
    """Run the real ``Trainer`` (or ``trainer``, a subclass) on ``cfg`` (with ``topology``)
    and return the metrics it logged for each step after the first ``skip`` (warm-up; all
    of them if none is left)."""
    from rlalign_ray.trainers import Trainer

    (trainer or Trainer)(cfg, topology=topology).fit()
    path = os.path.join(cfg.trainer.output_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(x) for x in f]
    return [r for r in rows if r["step"] > skip] or rows


def medians(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """The median of each key over ``rows`` (0.0 where a row lacks it)."""
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def parse_list(text: str, cast=str) -> list:
    return [cast(x) for x in str(text).split(",") if x.strip()]


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))


def write_json(path: str, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak RSS above the level at entry, sampled every ``interval`` s (the kernel's
    high-water mark cannot be reset, so a thread samples ``/proc/self/statm``)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        self.base = rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def gb(n: float) -> float:
    return n / 1e9
