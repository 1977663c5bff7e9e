"""Shared fixtures: a tiny locally built model, a real local Ray instance, small configs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from rlalign_ray.runtime.cluster import LOOPBACK

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
# the marks of a module whose tests start vLLM engines
VLLM_TESTS = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (bash launch/install_vllm.sh)",
    ),
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised tiny Llama with the project's character tokenizer."""
    from rlalign_ray.models.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(str(path))
    return str(path)


FULL = os.environ.get("RLALIGN_FULL_TESTS", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    """Two tiers: the default one (CI's, under 45 min on 2 cores) covers every feature once;
    ``RLALIGN_FULL_TESTS=1`` adds the tests marked ``full`` (more splits, transports and
    table rows of the same features)."""
    if FULL:
        return
    skip = pytest.mark.skip(reason="extended tier: RLALIGN_FULL_TESTS=1 runs it")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _logged_metrics_are_documented(request):
    """After an integration test: every key a Trainer run wrote to ``metrics.jsonl`` (a run
    folder with a ``final/``, under the test's ``tmp_path``) is in the metric catalogue,
    ``rlalign_ray/metrics_doc.py``, that the metrics reference is generated from."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or request.node.get_closest_marker("integration") is None:
        return
    import json

    from rlalign_ray.metrics_doc import undocumented

    for path in Path(tmp).rglob("metrics.jsonl"):
        if (path.parent / "final").is_dir():
            keys = {k for line in path.read_text().splitlines() for k in json.loads(line)}
            missing = undocumented(keys)
            assert not missing, f"{path}: add {missing} to rlalign_ray/metrics_doc.py"


TEST_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}}
_LOCAL: dict = {}


@pytest.fixture
def ray_local():
    """A real local Ray instance on loopback (``LOOPBACK``), shared by the tests that ask for it (started
    again if a multi-node test shut it down)."""
    import ray

    if not (ray.is_initialized() and _LOCAL.get("up")):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            runtime_env=TEST_ENV,
            logging_level="WARNING",
        )
        _LOCAL["up"] = True
    return ray


@pytest.fixture
def no_ray():
    """For tests that start their own cluster: no shared instance is running."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _LOCAL["up"] = False
    yield
    if ray.is_initialized():
        ray.shutdown()


def run_example(script: str, output_dir: Path, cwd: Path, steps: int = 2):
    """``launch/examples/<script> --steps N --output-dir DIR`` in a process of its own (the
    examples start their own Ray instance); returns the finished process."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(REPO / "launch/examples" / script), "--steps", str(steps),
         "--output-dir", str(output_dir)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip


def small_config(model: str, output_dir: str, **sections) -> dict:
    """A small, fast config dict; ``sections`` override whole keys per section."""
    cfg = {
        "model": {"path": model},
        "data": {
            "train": str(REPO / "configs/data/arith_train.jsonl"),
            "eval": str(REPO / "configs/data/arith_eval.jsonl"),
            "eval_limit": 8,
        },
        "rollout": {
            "prompts_per_step": 4,
            "n_samples": 2,
            "max_new_tokens": 4,
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
        },
        "reward": {
            "rewards": [{"type": "function", "path": "helpers.rewards:digit_fraction"}],
            "num_actors": 2,
            "resources": {"num_cpus": 0.5},
        },
        "algorithm": {"name": "grpo", "kl_coef": 0.01},
        "reference": {"resources": {"num_cpus": 0.5}},
        "learner": {
            "world_size": 1,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "resources": {"num_cpus": 0.5},
        },
        "trainer": {
            "steps": 2,
            "eval_every": 0,
            "output_dir": output_dir,
            "tensorboard": False,
            "progress_bar": False,
        },
        "run": {"placement_timeout_s": 30, "call_timeout_s": 300},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg
