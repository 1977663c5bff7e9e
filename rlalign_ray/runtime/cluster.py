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


# What the working directory leaves behind when it is uploaded to a cluster (Ray's
# runtime_env "excludes", gitignore syntax; .gitignore files are honoured as well).
# launch/submit.sh uploads with the same list.
WORKING_DIR_EXCLUDES = [
    "runs/", "outputs/", "wandb/", "mlruns/", ".git/", "**/__pycache__/", "*.pyc",
    "*.egg-info/", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", ".venv/", "venv/",
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf",
]  # fmt: skip
# Set by Ray in the driver of a `ray job submit` job: the job's runtime env is in force.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def connect(run: RunConfig, cpus_needed: float) -> bool:
    """Attach to ``run.ray_address`` / ``RAY_ADDRESS`` / the job's cluster, else start one.

    The user's modules (``module:name`` in the config) import from the working directory
    on the workers too: an embedded instance puts it on the workers' ``PYTHONPATH``; a run
    attached to a cluster uploads it (``shipped_working_dir``). Returns True when this call
    started an embedded instance (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        attach(address, "run.ray_address" if run.ray_address else "RAY_ADDRESS", run)
        return False
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


def shipped_working_dir(run: RunConfig | None) -> dict[str, Any] | None:
    """The runtime env that uploads the working directory to a cluster's workers, or None:
    inside a ``ray job submit`` job (its own runtime env, working dir included, stays in
    force) or with ``run.ship_working_dir: false``."""
    if run is None or not run.ship_working_dir or JOB_CONFIG_ENV in os.environ:
        return None
    return {"working_dir": os.getcwd(), "excludes": list(WORKING_DIR_EXCLUDES)}


def attach(address: str, where: str, run: RunConfig | None = None) -> None:
    """``ray.init`` on a running cluster, failing fast and clearly; with ``run``, the
    working directory travels to the workers (``shipped_working_dir``)."""
    import ray

    log.info("attaching to the Ray cluster at %s", address)
    check_reachable(address, where)
    runtime_env = shipped_working_dir(run)
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ClusterError(
            f"{where}: cannot attach to the Ray cluster at {address!r} ({e}); start it "
            "(ray start --head) or fix the address"
        ) from None
    except Exception as e:  # the upload of the working dir failed (too big, unreadable)
        if runtime_env is None:
            raise
        if ray.is_initialized():
            ray.shutdown()
        raise ClusterError(
            f"run.ship_working_dir: uploading the working directory {os.getcwd()} to the "
            f"cluster failed ({type(e).__name__}: {e}); run from the folder that holds your "
            "config and modules (runs/, .git/ and weight files stay behind), or set "
            "run.ship_working_dir: false when the nodes have your modules already"
        ) from None


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
