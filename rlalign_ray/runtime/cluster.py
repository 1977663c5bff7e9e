"""Connecting to Ray: attach to a cluster, or start an embedded local instance."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from rlalign_ray.config import RunConfig
from rlalign_ray.errors import ClusterError

log = logging.getLogger(__name__)


def worker_env(cpu_only: bool) -> dict[str, str]:
    """Environment variables for rlalign-ray's actors (``cpu_only``: it asked for no GPU)."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    # DeepSpeed otherwise guesses its accelerator from what it can import and see, and may
    # pick the CPU on a GPU node whose driver check fails late, or CUDA on a CPU actor
    env["DS_ACCELERATOR"] = "cpu" if cpu_only else "cuda"
    cache = os.environ.get("RLALIGN_RAY_CACHE")
    if cache:
        env["RLALIGN_RAY_CACHE"] = cache
    return env


# The embedded instance listens on loopback only. Ray replaces "127.0.0.1" and "localhost"
# with the machine's routable address (``resolve_ip_for_localhost``), so another address of
# the loopback range is given.
LOOPBACK = "127.0.0.2"


def connect(run: RunConfig, cpus_needed: float) -> bool:
    """Attach to ``run.ray_address`` / ``RAY_ADDRESS`` / the job's cluster, else start one.

    Returns True when this call started an embedded instance (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # The job's own runtime environment (ray job submit --working-dir ...) stays in force.
        log.info("attaching to the Ray cluster at %s", address)
        where = "run.ray_address" if run.ray_address else "RAY_ADDRESS"
        check_reachable(address, where)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ClusterError(
                f"{where}: cannot attach to the Ray cluster at {address!r} ({e}); start it "
                "(ray start --head) or fix the address"
            ) from None
        return False
    # Worker processes import the user's reward modules from the working directory.
    pythonpath = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": pythonpath}}
    num_cpus = run.num_cpus or max(float(os.cpu_count() or 1), cpus_needed)
    log.info("starting an embedded local Ray instance (%g logical CPUs)", num_cpus)
    try:
        ray.init(
            address="local",
            num_cpus=int(num_cpus + 0.999),
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except Exception as e:  # Ray raises a bare Exception when its processes do not start
        if ray.is_initialized():
            ray.shutdown()
        raise ClusterError(
            f"the embedded Ray instance did not start ({type(e).__name__}: {e}); see the "
            "logs under /tmp/ray/session_latest/logs, free some CPU or memory, or attach to "
            "a running cluster with run.ray_address"
        ) from None
    return True


def check_reachable(address: str, where: str, timeout_s: float = 5.0) -> None:
    """Fail fast when ``host:port`` does not accept connections (``ray.init`` would retry
    for minutes); other address forms (``auto``, ``local``) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"{where}: no Ray cluster answers at {address!r} ({e.strerror or e}); start it "
            "(ray start --head), fix the address, or leave run.ray_address null to start "
            "an embedded local instance"
        ) from None


def describe_cluster() -> str:
    """Per-node total and available resources, for placement errors."""
    import ray

    avail = ray.available_resources()
    lines = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = {
            k: v
            for k, v in node["Resources"].items()
            if not k.startswith("node:")
            and k not in ("object_store_memory",)
            and not k.startswith("accelerator_type")
        }
        lines.append(
            f"  node {node['NodeManagerAddress']} ({node['NodeID'][:8]}): "
            + ", ".join(f"{k}={_fmt(k, v)}" for k, v in sorted(res.items()))
        )
    lines.append(
        "  available now: "
        + ", ".join(
            f"{k}={_fmt(k, v)}"
            for k, v in sorted(avail.items())
            if not k.startswith("node:") and k != "object_store_memory"
        )
    )
    return "\n".join(lines)


def _fmt(key: str, value: float) -> str:
    return f"{value / 1024**3:.1f}GiB" if key == "memory" else f"{value:g}"
