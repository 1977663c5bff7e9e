"""Soak: memory of every actor, the driver and the object store over a long run.

    rlalign-ray bench soak CONFIG [overrides] --steps 500 [--window 20] [--limit 0.05]

Runs the real ``Trainer`` on CONFIG for ``--steps`` steps (no evaluation, no checkpoints,
a throw-away output folder; overrides after CONFIG apply on top) and, after every step's
weight publication, samples:

- each actor's RSS: its process (and any children, e.g. a vLLM engine core) read with
  psutil when it runs on the driver's node, else asked of the actor itself. The PID and
  node of every actor are asked once, through ``actor.__ray_call__``;
- the driver's RSS (its own process), and, when the driver started an embedded Ray
  instance, the RSS of that instance's own processes (raylet, GCS, agents, idle
  workers: the driver's descendants that are not actors), and the number of object refs the driver holds
  (``core_worker.get_all_reference_counts``);
- the object store's used bytes, summed over the cluster's nodes, as the raylet reports
  them (``FormatGlobalMemoryInfo``: ``store_stats.object_store_bytes_used``, what
  ``ray memory --stats-only`` prints).

Growth of a series is ``(end - base) / base`` where ``end`` is the mean of the last
``--window`` samples and ``base`` the mean of the ``--window`` samples centred on step
``--base-step`` (default: ``steps - 400``, so the last 400 steps are judged; step 1 for
shorter runs). Means over a window make one step's transient (a batch in flight) count
little. Per role the table shows the mean over the role's actors; the JSON has every
actor. Target: every RSS series grows <= ``--limit`` (5%). The object store is judged in
absolute terms when its base is small (under ``--store-floor-mb``): a store that holds a
few MiB of in-flight batches is not a leak at +50%, so its growth counts against the
limit only above that floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

from rlalign_ray.bench.common import bench_overrides, print_table

LIMIT = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n_samples=2")
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument(
        "--base-step",
        type=int,
        default=None,
        help="growth is measured from here to the end (default: steps - 400, at least 1)",
    )
    p.add_argument("--window", type=int, default=20, help="samples averaged at each end")
    p.add_argument("--limit", type=float, default=LIMIT, help="allowed growth (0.05: 5%%)")
    p.add_argument(
        "--store-floor-mb",
        type=float,
        default=64.0,
        help="object-store growth is judged only once its base holds this much",
    )


# ---- what runs in the actors ------------------------------------------------------------
def _whoami(_self: Any) -> tuple[int, str]:
    import ray

    return os.getpid(), ray.get_runtime_context().get_node_id()


def _own_rss(_self: Any) -> int:
    return process_rss(os.getpid())


def process_rss(pid: int, children: bool = True) -> int:
    """RSS of ``pid`` and (``children``) its descendants (0 once it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True) if children else []:
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def system_rss(driver: int, actors: frozenset[int]) -> dict[str, int]:
    """RSS of the driver's descendants outside the actors' process trees, summed by process
    name (``raylet``, ``gcs_server``, ``ray::IDLE``, ...)."""
    import psutil

    out: dict[str, int] = {}
    for child in psutil.Process(driver).children(recursive=True):
        try:
            if child.pid in actors or any(p.pid in actors for p in child.parents()):
                continue
            name = child.name()
            out[name] = out.get(name, 0) + child.memory_info().rss
        except psutil.Error:
            pass
    return out


def object_store_used() -> dict[str, int]:
    """Used and primary-copy bytes of the object store and its object count, over the
    cluster (the raylet's global memory info, as ``ray memory --stats-only``)."""
    import ray._private.state
    from ray._private.internal_api import get_memory_info_reply

    s = get_memory_info_reply(ray._private.state.state, timeout_seconds=30).store_stats
    return {
        "used": int(s.object_store_bytes_used),
        "primary": int(s.object_store_bytes_primary_copy),
        "objects": int(s.num_local_objects),
    }


def driver_refs() -> int:
    import ray

    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


# ---- the sampler ------------------------------------------------------------------------
class Sampler:
    """One sample per call: RSS of every actor of every pool and of the driver, the object
    store, and the refs the driver holds."""

    def __init__(self, every: int = 50) -> None:
        self.every = every  # print a progress line every this many steps
        self.actors: list[dict[str, Any]] = []  # role, index, pid, local, handle
        self.samples: list[dict[str, Any]] = []
        self.embedded = False  # the driver started Ray: its processes are the driver's children

    def find(self, pools: dict[str, Any]) -> None:
        import psutil
        import ray

        here = ray.get_runtime_context().get_node_id()
        self.embedded = bool(psutil.Process().children())
        for role, pool in pools.items():
            for i, actor in enumerate(pool.actors):
                pid, node = ray.get(actor.__ray_call__.remote(_whoami), timeout=120)
                self.actors.append(
                    {"role": role, "index": i, "pid": pid, "local": node == here, "handle": actor}
                )

    def sample(self, step: int) -> None:
        import ray

        remote = {
            k: a["handle"].__ray_call__.remote(_own_rss)
            for k, a in enumerate(self.actors)
            if not a["local"]
        }
        rss = {
            f"{a['role']}/{a['index']}": (
                ray.get(remote[k], timeout=120) if k in remote else process_rss(a["pid"])
            )
            for k, a in enumerate(self.actors)
        }
        driver = os.getpid()
        rss["driver/0"] = process_rss(driver, children=False)
        system: dict[str, int] = {}
        if self.embedded:  # the embedded instance's raylet, GCS, agents and idle workers
            system = system_rss(driver, frozenset(a["pid"] for a in self.actors))
            rss["ray-system/0"] = sum(system.values())
        self.samples.append(
            {
                "step": step,
                "time": time.time(),
                "rss": rss,
                "store": object_store_used(),
                "driver_refs": driver_refs(),
                "system": system,
            }
        )
        if step == 1 or step % self.every == 0:
            s = self.samples[-1]
            actors = sum(v for k, v in rss.items() if not k.startswith(("driver", "ray-")))
            print(
                f"soak step {step}: actors {actors / 2**20:.0f} MiB, driver "
                f"{rss['driver/0'] / 2**20:.0f} MiB, store {s['store']['used'] / 2**20:.1f} MiB, "
                f"driver refs {s['driver_refs']}",
                flush=True,
            )


def soak_trainer(cfg: Any, sampler: Sampler) -> Any:
    """The Trainer on ``cfg``, sampling memory after each step's weights are published."""
    from rlalign_ray.trainers import Trainer

    class SoakTrainer(Trainer):
        steps_done = 0

        def broadcast(self, version: int) -> int:
            n = super().broadcast(version)
            if not sampler.actors:
                sampler.find(self.pools)
            self.steps_done += 1
            sampler.sample(self.steps_done)
            return n

    return SoakTrainer(cfg)


# ---- growth -----------------------------------------------------------------------------
def window_growth(values: list[float], base_index: int, window: int) -> dict[str, float]:
    """Mean of ``window`` values centred on ``base_index`` (clipped to the series), mean of
    the last ``window``, and the relative growth between them."""
    n = len(values)
    w = max(1, min(window, n))
    lo = min(max(0, base_index - w // 2), n - w)
    base = statistics.fmean(values[lo : lo + w])
    end = statistics.fmean(values[n - w :])
    return {"base": base, "end": end, "growth": (end - base) / base if base else 0.0}


def role_rows(
    samples: list[dict[str, Any]],
    per_actor: dict[str, dict[str, float]],
    base_index: int,
    window: int,
    limit: float,
) -> list[dict[str, Any]]:
    """One row per role (actor key ``role/index``): growth of the mean RSS over the role's
    actors; the row passes when its worst actor's growth is within ``limit``."""
    roles: dict[str, list[str]] = {}
    for k in per_actor:
        roles.setdefault(k.split("/")[0], []).append(k)
    rows = []
    for role, ks in roles.items():
        series = [statistics.fmean(float(s["rss"][k]) for k in ks) for s in samples]
        g = window_growth(series, base_index, window)
        worst = max(per_actor[k]["growth"] for k in ks)
        rows.append(
            {
                "series": f"rss {role} (x{len(ks)})",
                "base_mb": g["base"] / 2**20,
                "end_mb": g["end"] / 2**20,
                "growth": g["growth"],
                "worst_actor": worst,
                "pass": worst <= limit,
            }
        )
    return rows


def store_row(
    samples: list[dict[str, Any]], base_index: int, window: int, limit: float, store_floor: float
) -> dict[str, Any]:
    """The object store's row: judged on growth above a base of ``store_floor`` MiB, below
    it on absolute growth (at most ``store_floor`` MiB)."""
    store = window_growth([float(s["store"]["used"]) for s in samples], base_index, window)
    judged = store["base"] >= store_floor * 2**20
    return {
        "series": "object store used",
        "base_mb": store["base"] / 2**20,
        "end_mb": store["end"] / 2**20,
        "growth": store["growth"],
        "worst_actor": store["growth"],
        "pass": store["growth"] <= limit
        if judged
        else store["end"] - store["base"] <= store_floor * 2**20,
    }


def refs_row(
    samples: list[dict[str, Any]], base_index: int, window: int, limit: float
) -> dict[str, Any]:
    """The driver's object-ref count row (counts, not MB): passes within ``limit`` or 10 refs."""
    refs = window_growth([float(s["driver_refs"]) for s in samples], base_index, window)
    return {
        "series": "driver object refs",
        "base_mb": refs["base"],
        "end_mb": refs["end"],
        "growth": refs["growth"],
        "worst_actor": refs["growth"],
        "pass": refs["end"] <= max(refs["base"] * (1 + limit), refs["base"] + 10),
    }


def summarize(
    samples: list[dict[str, Any]], base_step: int, window: int, limit: float, store_floor: float
) -> dict[str, Any]:
    steps = [s["step"] for s in samples]
    base_index = min(range(len(steps)), key=lambda i: abs(steps[i] - base_step))
    per_actor = {
        k: window_growth([float(s["rss"][k]) for s in samples], base_index, window)
        for k in samples[0]["rss"]
    }
    rows = [
        *role_rows(samples, per_actor, base_index, window, limit),
        store_row(samples, base_index, window, limit, store_floor),
        refs_row(samples, base_index, window, limit),
    ]
    names = sorted({n for s in samples for n in s.get("system", {})})
    system = {
        n: window_growth([float(s["system"].get(n, 0)) for s in samples], base_index, window)
        for n in names
    }
    return {
        "system_processes": system,
        "base_step": steps[base_index],
        "end_steps": [steps[-min(window, len(steps))], steps[-1]],
        "window": window,
        "limit": limit,
        "rows": rows,
        "per_actor": per_actor,
        "pass": all(r["pass"] for r in rows),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rlalign_ray.config import load_config

    sampler = Sampler()
    base_step = args.base_step if args.base_step is not None else max(1, args.steps - 400)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlalign-bench-soak-") as tmp:
        cfg = load_config(args.config, [*bench_overrides(tmp, args.steps), *args.overrides])
        soak_trainer(cfg, sampler).fit()
    wall = time.perf_counter() - t0
    if not sampler.samples:
        raise RuntimeError("bench soak: the run logged no step; nothing was sampled")
    summary = summarize(sampler.samples, base_step, args.window, args.limit, args.store_floor_mb)
    out = {
        "source": " ".join([args.config, *args.overrides]),
        "steps": args.steps,
        "wall_s": wall,
        "actors": [{k: a[k] for k in ("role", "index", "pid", "local")} for a in sampler.actors],
        "summary": summary,
        "samples": sampler.samples,
    }
    report(out)
    return out


def report(out: dict[str, Any]) -> None:
    s = out["summary"]
    print_table(
        f"soak: {out['source']}; {out['steps']} steps in {out['wall_s']:.0f} s; mean of "
        f"{s['window']} samples around step {s['base_step']} (base) and over steps "
        f"{s['end_steps'][0]}-{s['end_steps'][1]} (end); refs row in counts, not MB",
        [
            {
                **r,
                "growth": f"{r['growth']:+.2%}",
                "worst_actor": f"{r['worst_actor']:+.2%}",
                "pass": "PASS" if r["pass"] else "FAIL",
            }  # fmt: skip
            for r in s["rows"]
        ],
        ["series", "base_mb", "end_mb", "growth", "worst_actor", "pass"],
    )
    if s["system_processes"]:
        print(
            "ray-system by process (base -> end MiB): "
            + ", ".join(
                f"{n} {g['base'] / 2**20:.0f}->{g['end'] / 2**20:.0f}"
                for n, g in s["system_processes"].items()
            )
        )
    verdict = "PASS" if s["pass"] else "FAIL"
    print(f"growth over steps {s['base_step']}-{out['steps']}: limit {s['limit']:.0%} ({verdict})")
