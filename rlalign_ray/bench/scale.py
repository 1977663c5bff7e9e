"""Driver time per step with many simulated generator and reward actors on a multi-node
cluster.

    rlalign-ray bench scale --simulate [SPEC] --actors 64,128,256 [--workers 2]
        [--dispatch-group 64] [--per-host 64]

Starts a multi-node cluster on this machine (``launch/local_cluster.sh``: a head and
``--workers`` worker nodes, each a ``ray start`` on loopback (127.0.0.2) with token auth, in a temp
folder of its own, stopped at the end). For each count N, a fresh driver process (Ray reads
the cluster's token settings when it is imported) runs ``--steps`` steps of the real
``Trainer`` with N simulated actors in total, N/2 generators and N/2 reward actors, spread
over the nodes, and one simulated learner rank (``bench/simulated.py``; work times from SPEC,
by default none): each step is N/2 one-prompt chunks, pulled by the generators, each scored
by a reward actor as it lands, then a weight sync to the N/2 generators. The simulated
generators and reward actors run ``--per-host`` (64) to a process, per node and role
(``bench/hosted.py``): each is a handle whose calls are Ray calls to its host, so the driver
makes the same Ray calls per simulated actor as with a process each (``--per-host 0``), but
the machine does not pay a Ray worker per actor (about 65 MB of private memory and, idle,
9 ms of CPU per second each; the dispatchers and the learner rank keep a process each).
With ``--dispatch-group G`` (the default, 64; ``rollout.dispatch_group``) dispatcher actors
run the generators in groups of G, so the driver makes one call per group per step and per
weight bucket; 0 measures the driver calling every generator itself.

Driver time per step is the median ``time/driver_cpu_s``: the CPU time of the driver process
(its Python and Ray's threads in it) during a step. On a machine shared with hundreds of
actor processes, wall time minus the driver's waits would also count the time it waits for
a CPU; its CPU time is what it does itself. Target: <= 50 ms at 256 actors.

Two same-run units come with it, both taken before the last step: the driver's CPU for one
no-op actor call (``calls_per_step``: a step's work in such calls), and its CPU per second
with nothing in flight (Ray's own threads in the process: ``idle_s_per_step`` is that rate
over a step's wall time, a share that grows with the step's length, not with the driver's
work), with the share of the machine's CPUs busy meanwhile (each idle Ray actor wakes every
10 ms to check for signals: measured here, about 9 ms of CPU per second per actor, so 256 of
them want more than 2 cores before any work). The nodes run at ``--node-nice`` (10): on a
real cluster the driver does not share its cores with its actors.

A count whose actor processes (hosts, dispatchers, the learner rank; none imports torch)
would not fit in the memory available now (``--mb-per-actor`` each) is skipped and reported
as infeasible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlalign_ray.bench.common import medians, parse_list, print_table, train_rows
from rlalign_ray.errors import RlalignError

REPO = Path(__file__).resolve().parents[2]
TARGET_S = 0.050  # driver time per step at 256 actors


class LowMemory(RlalignError):
    """A count's actors took the machine's memory down to ``--min-free-gb``."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate",
        nargs="?",
        const="gen=0,train=0",
        default="gen=0,train=0",
        metavar="SPEC",
        help="simulated actors (the only kind here): gen=S,train=S[,tail=...] (default: no work)",
    )
    p.add_argument(
        "--actors",
        default="64,128,256",
        help="actor counts: each N is N/2 generators and N/2 reward actors",
    )
    p.add_argument(
        "--dispatch-group",
        type=int,
        default=64,
        help="rollout.dispatch_group: generators per dispatcher actor (0: none)",
    )
    p.add_argument(
        "--per-host",
        type=int,
        default=64,
        help="simulated generators (reward actors) per host process on a node (0: one "
        "process per simulated actor)",
    )
    p.add_argument("--steps", type=int, default=8, help="training steps per count")
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    p.add_argument("--max-staleness", type=int, default=0, help="trainer.max_staleness")
    p.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    p.add_argument("--node-cpus", type=int, default=4, help="logical CPUs each node declares")
    p.add_argument(
        "--node-nice",
        type=int,
        default=10,
        help="niceness of the cluster's nodes and their actors (the driver keeps 0): on a real "
        "cluster the driver does not share its cores with the actors (0: share equally)",
    )
    p.add_argument(
        "--mb-per-actor", type=float, default=65.0, help="memory one actor process takes (MB)"
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="skip a count whose actors need more than this share of the available memory",
    )
    p.add_argument(
        "--min-free-gb",
        type=float,
        default=2.0,
        help="stop a count's driver (its actors go with it) if available memory falls below",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per count at most")
    p.add_argument("--driver", default=None, help=argparse.SUPPRESS)  # cluster.env: one count here


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rlalign_ray.bench.simulated import Workload

    Workload.parse(args.simulate, 1, 1)  # check SPEC before starting anything
    if args.driver:
        return drive(args)
    runs, infeasible = [], []
    with local_cluster(args.workers, args.node_cpus, args.node_nice) as state:
        for n in parse_list(args.actors, int):
            procs = processes(args, n)
            need = procs * args.mb_per_actor * 2**20
            free = mem_available()
            if need > args.memory_fraction * free:
                infeasible.append(
                    {
                        "actors": n,
                        "reason": f"{procs} actor processes need about {need / 2**30:.1f} "
                        f"GiB, {free / 2**30:.1f} GiB available (--memory-fraction "
                        f"{args.memory_fraction})",
                    }
                )
                continue
            try:
                runs.append(driver_process(args, n, state))
            except LowMemory as e:
                infeasible.append({"actors": n, "reason": str(e)})
                continue
            r = runs[-1]
            print(
                f"{n} actors: driver {r['driver_s_per_step'] * 1e3:.1f} ms/step, step "
                f"{r['step_s']:.3f} s, {r['memory_gb']:.1f} GiB, {r['run_s']:.0f} s",
                flush=True,
            )
    results = [{"actors": r["actors"], "driver_s_per_step": r["driver_s_per_step"]} for r in runs]
    report(args, runs, infeasible)
    return {"results": results, "runs": runs, "infeasible": infeasible}


def processes(args: argparse.Namespace, n: int) -> int:
    """At most how many actor processes a count of ``n`` starts: the hosts of N/2 generators
    and N/2 reward actors, the learner rank, the dispatchers."""
    from rlalign_ray.bench.hosted import host_count

    gens, nodes = max(1, n // 2), args.workers + 1
    hosts = sum(host_count(k, args.per_host, nodes) for k in (gens, max(1, n - gens)))
    return hosts + 1 + (-(-gens // args.dispatch_group) if args.dispatch_group else 0)


def report(args: argparse.Namespace, runs: list[dict], infeasible: list[dict]) -> None:
    if runs:
        print_table(
            f"scale: --simulate {args.simulate}, {args.workers + 1} nodes, "
            f"k={args.max_staleness}, dispatch group {args.dispatch_group}, "
            f"{args.per_host or 1} simulated actors per process, median of steps > {args.skip}; "
            "N actors = N/2 generators + N/2 reward actors; driver time = the driver process's "
            "CPU per step",
            runs,
            [
                "actors",
                "generators",
                "driver_s_per_step",
                "step_s",
                "generate_s",
                "nodes",
                "memory_gb",
                "run_s",
                "call_quiet_s",
                "call_loaded_s",
                "calls_per_step",
                "idle_s_per_step",
            ],
        )
    for r in infeasible:
        print(f"{r['actors']} actors: not run: {r['reason']}")
    at = {r["actors"]: r["driver_s_per_step"] for r in runs}
    if 256 in at:
        met = "met" if at[256] <= TARGET_S else "MISSED"
        print(f"256 actors: {at[256] * 1e3:.1f} ms/step; target <= 50 ms ({met})")
    elif len(at) > 1:  # a least-squares line through the counts measured
        n, y = list(at), list(at.values())
        mx, my = sum(n) / len(n), sum(y) / len(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(n, y)) / sum((a - mx) ** 2 for a in n)
        guess = my + slope * (256 - mx)
        print(
            f"256 actors not measured; a line through the counts measured ({slope * 1e3:.2f} "
            f"ms per actor) puts it near {guess * 1e3:.0f} ms/step (target <= 50 ms)"
        )
    for r in runs:  # the same work at a quiet machine's cost of a call (an estimate)
        scaled = r["driver_s_per_step"] * r["call_quiet_s"] / r["call_loaded_s"]
        print(
            f"{r['actors']} actors: a no-op call cost the driver {r['call_loaded_s'] * 1e3:.2f}"
            f" ms of CPU under the run's load, {r['call_quiet_s'] * 1e3:.2f} ms before its "
            f"actors started; a step's work is {r['calls_per_step']:.0f} such calls, "
            f"{scaled * 1e3:.1f} ms at the quiet cost (estimate)"
        )
        print(
            f"{r['actors']} actors: with nothing in flight the driver's process used "
            f"{r['idle_cpu_per_s'] * 1e3:.1f} ms of CPU per second (Ray's threads); over a "
            f"{r['step_s']:.2f} s step that is {r['idle_s_per_step'] * 1e3:.1f} ms of its "
            f"{r['driver_s_per_step'] * 1e3:.1f} ms ("
            f"{(r['driver_s_per_step'] - r['idle_s_per_step']) * 1e3:.1f} ms beyond it); the "
            "machine's CPUs were "
            f"{r['machine_busy_idle']:.0%} busy meanwhile (the actors' own idle loops)"
        )


# ---- the cluster ----------------------------------------------------------------------------
@contextmanager
def local_cluster(workers: int, cpus: int, nice: int = 0):
    """``launch/local_cluster.sh`` nodes in a temp folder of their own, at niceness ``nice``
    (their actors inherit it); yields the cluster's state (``cluster.env``: address, token
    path) and stops exactly these nodes on exit."""
    script = REPO / "launch" / "local_cluster.sh"
    if not script.is_file():
        raise RlalignError(f"bench scale starts its cluster with {script}, which is missing")
    temp = tempfile.mkdtemp(prefix="rlsc", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # hundreds of workers starting on a few cores take longer than Ray's 60 s to register;
    # a raylet that gives up on them starts them again, and the start never settles
    env["RAY_worker_register_timeout_seconds"] = "900"
    try:
        start = subprocess.run(
            ["nice", "-n", str(nice), "bash", str(script), "start", "--workers", str(workers),
             "--temp-dir", temp, "--head-cpus", str(cpus), "--worker-cpus", str(cpus),
             "--object-store-mb", "256", "--timeout", "300"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if start.returncode != 0:
            raise RlalignError(f"local_cluster.sh start failed:\n{start.stderr[-3000:]}")
        text = Path(temp, "cluster.env").read_text()
        yield dict(x.split("=", 1) for x in text.splitlines() if "=" in x and x[0] != "#")
    finally:
        subprocess.run(
            ["bash", str(script), "stop", "--temp-dir", temp],
            env=env,
            capture_output=True,
            timeout=300,
        )
        shutil.rmtree(temp, ignore_errors=True)


def driver_process(args: argparse.Namespace, n: int, state: dict[str, str]) -> dict[str, Any]:
    """One count in a fresh driver process; its result, with the machine's memory growth."""
    cmd = [
        sys.executable, "-m", "rlalign_ray.cli", "bench", "scale", "--driver",
        json.dumps(state), "--actors", str(n), "--simulate", args.simulate,
        "--steps", str(args.steps), "--skip", str(args.skip),
        "--max-staleness", str(args.max_staleness), "--dispatch-group", str(args.dispatch_group),
        "--per-host", str(args.per_host),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=state["RAY_AUTH_TOKEN_PATH"],
        PYTHONPATH=python_path(),
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with LowestAvailable(floor=int(args.min_free_gb * 2**30), proc=proc) as mem:
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    if mem.stopped:
        raise LowMemory(
            f"stopped: available memory fell below {args.min_free_gb:g} GiB (--min-free-gb)"
        )
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RlalignError(f"bench scale with {n} actors failed:\n{stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["memory_gb"] = mem.growth / 2**30
    result["run_s"] = time.perf_counter() - t0
    return result


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """This process is the driver of one count (``--driver STATE``): train, print RESULT."""
    import ray

    state, n = json.loads(args.driver), int(args.actors)
    ray.init(
        address=state["RAY_ADDRESS"],
        runtime_env={"env_vars": {"PYTHONPATH": python_path()}},
        logging_level="WARNING",
    )
    try:
        nodes = sum(1 for x in ray.nodes() if x["Alive"])
        with tempfile.TemporaryDirectory(prefix="rlalign-bench-scale-") as tmp:
            cfg, topo = count_setup(args, tmp, n)
            probe = ray.remote(Probe).options(num_cpus=0).remote()
            quiet = call_cpu_s(probe)  # before the actors start
            seen: dict[str, float] = {"quiet": quiet}
            rows = train_rows(cfg, topo, args.skip, trainer=probed_trainer(probe, seen))
    finally:
        ray.shutdown()
    result = {"actors": n, "generators": max(1, n // 2), "per_host": args.per_host}
    result.update(dispatch_group=args.dispatch_group, nodes=nodes, **summary(rows, seen))
    print("RESULT " + json.dumps(result), flush=True)
    return result


def count_setup(args: argparse.Namespace, tmp: str, n: int) -> tuple[Any, Any]:
    """The config and topology of a count: N/2 simulated generators and N/2 reward actors
    spread over the nodes (``--per-host`` to a process), one prompt per chunk."""
    from rlalign_ray.bench.simulated import Workload, simulated_config, simulated_topology
    from rlalign_ray.config import Placement

    gens = max(1, n // 2)
    cfg = simulated_config(
        tmp,
        args.steps,
        [
            f"rollout.prompts_per_step={gens}",
            "rollout.n_samples=2",
            f"rollout.num_actors={gens}",
            "rollout.chunk_size=1",
            f"rollout.dispatch_group={args.dispatch_group}",
            f"reward.num_actors={max(1, n - gens)}",
            "learner.micro_batch_size=2",
            f"trainer.max_staleness={args.max_staleness}",
            "run.placement_timeout_s=1800",
            "run.call_timeout_s=1800",
        ],
    )
    work = Workload.parse(args.simulate, cfg.batch_size, gens)
    topo = simulated_topology(cfg, work, args.per_host)
    for role in ("generator", "reward"):
        topo.pools[role].placement = Placement(strategy="SPREAD")
    return cfg, topo


def summary(rows: list[dict[str, Any]], seen: dict[str, float]) -> dict[str, Any]:
    """A count's figures: medians of the measured steps and the same-run units."""
    med = medians(rows, ("time/driver_cpu_s", "time/step_s", "time/generate_s"))
    return {
        "driver_s_per_step": med["time/driver_cpu_s"],
        "step_s": med["time/step_s"],
        "generate_s": med["time/generate_s"],
        "steps_measured": len(rows),
        # one no-op actor call's driver CPU, before the actors start and after the last step
        "call_quiet_s": seen["quiet"],
        "call_loaded_s": seen["call_cpu_s"],
        "calls_per_step": med["time/driver_cpu_s"] / seen["call_cpu_s"],
        # the driver's CPU per second with nothing in flight, and that rate over a step
        "idle_cpu_per_s": seen["idle_cpu_per_s"],
        "idle_s_per_step": seen["idle_cpu_per_s"] * med["time/step_s"],
        # the share of the machine's CPUs busy meanwhile: the actors' own idle loops
        "machine_busy_idle": seen["busy"],
    }


def python_path() -> str:
    """This checkout first on PYTHONPATH (the driver and every actor import it)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


# ---- what one call costs the driver, in the same run ------------------------------------
class Probe:
    """A no-op actor: the driver's CPU per call to it is the unit of ``calls_per_step``."""

    def ping(self) -> int:
        return 0


def call_cpu_s(actor: Any, calls: int = 200) -> float:
    """The driver's CPU (all its threads) per no-op call to ``actor``, one at a time: on a
    machine whose cores hundreds of actor processes share, every CPU-time figure is inflated
    (cache and scheduler churn), and this shows by how much."""
    import ray

    ray.get(actor.ping.remote())
    t0 = time.process_time()
    for _ in range(calls):
        ray.get(actor.ping.remote())
    return (time.process_time() - t0) / calls


def idle_cpu_per_s(seconds: float = 3.0) -> tuple[float, float]:
    """The driver's CPU per second while it waits with nothing in flight: Ray's own threads
    in the process (gRPC pollers, timers, the task-event buffer), whose cost grows with a
    step's wall time, not with the driver's work. Also the machine's busy share meanwhile
    (``/proc/stat``): what the cluster's idle actors take by themselves (each Ray worker
    wakes its main thread every 10 ms to check for signals)."""
    m0, t0 = machine_cpu(), time.process_time()
    time.sleep(seconds)
    (busy0, all0), (busy1, all1) = m0, machine_cpu()
    return (time.process_time() - t0) / seconds, (busy1 - busy0) / max(1, all1 - all0)


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all the machine's CPUs so far (0, 0 where unreadable)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = sum(ticks[3:5])  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def probed_trainer(probe: Any, seen: dict[str, float]) -> type:
    """The real ``Trainer``, which before its last step (every actor up, outside the step's
    own CPU count) puts ``call_cpu_s(probe)`` and ``idle_cpu_per_s()`` under the run's load
    in ``seen``."""
    from rlalign_ray.trainers import Trainer

    class ProbedTrainer(Trainer):
        def train_step(self, step, evals, logger, ledger):
            if step == self.cfg.trainer.steps:
                seen["call_cpu_s"] = call_cpu_s(probe)
                seen["idle_cpu_per_s"], seen["busy"] = idle_cpu_per_s()
            return super().train_step(step, evals, logger, ledger)

    return ProbedTrainer


# ---- memory -----------------------------------------------------------------------------------
def mem_available() -> int:
    """Bytes of memory available now (``MemAvailable``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class LowestAvailable:
    """How far the machine's available memory fell below its level at entry (sampled every
    ``interval`` s): what a run's processes took, give or take other users of the machine.
    Below ``floor`` bytes it kills ``proc`` (a driver: its actors die with it)."""

    def __init__(self, interval: float = 0.5, floor: int = 0, proc: Any = None):
        self.interval, self.floor, self.proc = interval, floor, proc
        self.growth, self.stopped = 0, False
        self._stop = threading.Event()

    def __enter__(self) -> LowestAvailable:
        self.base = self.low = mem_available()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.low = min(self.low, mem_available())
            if self.proc is not None and self.low < self.floor and self.proc.poll() is None:
                self.proc.kill()
                self.stopped = True

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = self.base - self.low
