"""Seconds per weight sync, per transport and receiver count, against an in-process copy.

A sender actor holds the weights as the learner does (``WeightSource``, no DeepSpeed) and
``WeightSync`` moves them, as in training, to real ``Generator`` actors (1 CPU each). A
sync is timed from the first publish call to every generator reporting the new version;
the first ``--warmup`` syncs of each setting are not timed (Ray's store touches its pages
only as it cycles through them: the first puts into it are several times slower).
``ratio_vs_memcpy`` is the best time to ``copy_`` the same tensors into preallocated
tensors in this process (torch's default threads), measured before and after every
setting, divided by the sync's best time; ``ratio_vs_1thread`` uses a one-thread copy, the
most one receiver with one CPU can do.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from rlalign_ray.bench.common import add_model_arguments, bench_model, parse_list, print_table
from rlalign_ray.sync.weight_sync import WeightSource


def add_arguments(p) -> None:
    add_model_arguments(p, default_params="100M")
    p.add_argument("--receivers", default="1,4", help="generator counts, e.g. 1,4")
    p.add_argument(
        "--transport",
        default="shared_memory,object_store,collective",
        help="transports to time",
    )
    p.add_argument("--bucket-mb", type=float, default=64.0, help="sync.bucket_mb")
    p.add_argument("--dtype", default="float32", help="generator dtype (weights travel in it)")
    p.add_argument("--repeat", type=int, default=5, help="timed syncs per setting (best kept)")
    p.add_argument("--warmup", type=int, default=3, help="untimed syncs before each setting")


class ModelSource(WeightSource):
    """The learner's side of a sync without DeepSpeed: a model loaded as the learner does."""

    def __init__(self, path: str, dtype: str = "float32"):
        from rlalign_ray.models.loading import load_causal_lm, set_threads

        set_threads(1)
        self.rank = 0
        self.model = load_causal_lm(path, dtype)

    def named_weights(self):
        return self.model.named_parameters()

    def gathered(self, params=None):
        return nullcontext()


def memcpy_seconds(
    src: list[torch.Tensor], dst: list[torch.Tensor], repeat: int, threads: int = 0
) -> float:
    """Best time to ``copy_`` ``src`` into the preallocated ``dst`` (``threads``: 0 for
    torch's default)."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(default)
    return min(times[1:])


class CopyBaseline:
    """The best in-process copy times seen over the whole run: torch's default threads
    (``memcpy_s``) and one thread (``one_thread_s``)."""

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor], repeat: int):
        self.src, self.dst, self.repeat = src, dst, repeat
        self.memcpy_s = memcpy_seconds(src, dst, repeat)
        self.one_thread_s = memcpy_seconds(src, dst, repeat, threads=1)

    def measure(self) -> None:
        """Time both copies again, keeping the best seen."""
        self.memcpy_s = min(self.memcpy_s, memcpy_seconds(self.src, self.dst, self.repeat))
        self.one_thread_s = min(
            self.one_thread_s, memcpy_seconds(self.src, self.dst, self.repeat, 1)
        )


def start_actors(path: str, dtype: str, count: int) -> tuple:
    """The sender (a ``ModelSource``) and ``count`` generators, 1 CPU each, once ready."""
    import ray

    from rlalign_ray.config import ModelConfig, Resources, RolloutConfig
    from rlalign_ray.rollout.generator import Generator

    source = ray.remote(num_cpus=1)(ModelSource).remote(path)
    rollout = RolloutConfig(dtype=dtype, resources=Resources(num_cpus=1))
    gens = [
        ray.remote(num_cpus=1)(Generator).remote(ModelConfig(path=path), rollout, 0, i)
        for i in range(count)
    ]
    ray.get([g.ping.remote() for g in gens])
    return source, gens


def time_setting(args, transport: str, source, gens: list, version: int) -> tuple[dict, int, int]:
    """Time ``args.repeat`` syncs (after ``args.warmup`` untimed ones) over ``transport`` to
    ``gens``, publishing versions after ``version``: the result row (best and median
    seconds, GB/s), the bytes a sync moves, and the last version published."""
    from rlalign_ray.config import SyncConfig
    from rlalign_ray.sync.weight_sync import WeightSync

    cfg = SyncConfig(transport=transport, bucket_mb=args.bucket_mb, timeout_s=600)
    sync = WeightSync(cfg, args.dtype, [source], gens)
    plan = sync.setup()
    times = []
    for _ in range(args.warmup + args.repeat):
        version += 1
        t0 = time.perf_counter()
        sync.sync(version)
        times.append(time.perf_counter() - t0)
    times = times[args.warmup :]
    best = min(times)
    row = {
        "transport": transport,
        "receivers": len(gens),
        "buckets": len(plan.buckets),
        "seconds": best,
        "median_s": statistics.median(times),
        "GB/s": plan.num_bytes / best / 1e9,
    }
    return row, plan.num_bytes, version


def report(args, nbytes: int, copies: CopyBaseline, results: list[dict]) -> None:
    memcpy_s, one_thread_s = copies.memcpy_s, copies.one_thread_s
    print_table(
        f"bench weights: {nbytes / 1e6:.0f} MB in {args.dtype}, buckets of {args.bucket_mb:g} MiB; "
        f"in-process copy {memcpy_s:.4f}s ({nbytes / memcpy_s / 1e9:.1f} GB/s; one thread "
        f"{one_thread_s:.4f}s); "
        f"best of {args.repeat} after {args.warmup} warm-up syncs",
        results,
        [
            "transport",
            "receivers",
            "buckets",
            "seconds",
            "median_s",
            "GB/s",
            "ratio_vs_memcpy",
            "ratio_vs_1thread",
        ],
    )


def run(args) -> dict:
    import ray

    from rlalign_ray.config import RunConfig
    from rlalign_ray.models.loading import load_causal_lm
    from rlalign_ray.runtime.cluster import connect

    path = bench_model(args)
    receivers = parse_list(args.receivers, int)
    transports = parse_list(args.transport)
    src = [p.detach() for p in load_causal_lm(path, "float32").parameters()]
    dst = [torch.empty_like(t, dtype=getattr(torch, args.dtype)).copy_(t) for t in src]
    copies = CopyBaseline(src, dst, args.repeat)
    started = connect(RunConfig(), max(receivers) + 1)
    try:
        source, gens = start_actors(path, args.dtype, max(receivers))
        results, version = [], 0
        for transport in transports:
            for n in receivers:
                row, nbytes, version = time_setting(args, transport, source, gens[:n], version)
                copies.measure()
                results.append(row)
        for r in results:  # against the best copy seen in the whole run
            r["ratio_vs_memcpy"] = copies.memcpy_s / r["seconds"]
            r["ratio_vs_1thread"] = copies.one_thread_s / r["seconds"]
    finally:
        if started:
            ray.shutdown()
    report(args, nbytes, copies, results)
    return {
        "memcpy_s": copies.memcpy_s,
        "memcpy_1thread_s": copies.one_thread_s,
        "bytes": nbytes,
        "bucket_mb": args.bucket_mb,
        "dtype": args.dtype,
        "results": results,
    }
