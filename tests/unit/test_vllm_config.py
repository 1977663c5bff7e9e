"""Config checks for rollout.backend: vllm (run without vllm installed: nothing imports it)."""

from __future__ import annotations

import importlib.util

import pytest

from rlalign_ray.config import config_from_dict
from rlalign_ray.errors import ConfigError

REWARD = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]


def _problems(**rollout) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"rollout": rollout, "reward": {"rewards": REWARD}})
    return err.value.problems


def test_missing_vllm_names_the_install_script(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    (problem,) = _problems(backend="vllm")
    assert problem.startswith("rollout.backend:") and "bash launch/install_vllm.sh" in problem


def test_engine_keys_are_checked():
    vllm = {"gpu_memory_utilization": 1.5, "kv_cache_gb": 0, "max_model_len": -1}
    problems = _problems(backend="hf", vllm={**vllm, "enable_sleep_mode": True})
    for key in (
        "rollout.vllm: asks the vllm backend to sleep, but rollout.backend is hf",
        "rollout.vllm.gpu_memory_utilization: must be in (0, 1]",
        "rollout.vllm.kv_cache_gb: must be > 0",
        "rollout.vllm.max_model_len: must be >= 0",
    ):
        assert any(p.startswith(key) for p in problems), (key, problems)
    (problem,) = _problems(
        backend="vllm", vllm={"tensor_parallel_size": 2}, resources={"num_gpus": 1}
    )
    assert problem.startswith(
        "rollout.resources.num_gpus: each generator runs a vllm engine over 2 GPUs"
    ), problem
