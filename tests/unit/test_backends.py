"""The generation-backend registry (``rlalign_ray/rollout/backends.py``): ``rollout.backend``'s
values, each backend's own section and checks, capabilities asked instead of names, the old
flat vLLM keys refused with their new place, and backends from outside the package
(``tests/helpers/backends.py``, named by path) that build and generate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlalign_ray.config import ModelConfig, VLLMConfig, config_from_dict, load_config
from rlalign_ray.config.generation import MOVED_KEYS
from rlalign_ray.config_doc import config_help
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.errors import ConfigError
from rlalign_ray.rollout.backend import GenerationBackend, HFBackend, backend_class
from rlalign_ray.rollout.backends import BACKENDS, BackendType, backend_type
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.runtime.resources import role_needs

REWARD = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]


def _cfg(**rollout):
    return config_from_dict({"rollout": rollout, "reward": {"rewards": REWARD}})


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"reward": {"rewards": REWARD}, **raw})
    return err.value.problems


def test_the_registry_is_what_the_config_allows_and_help_lists():
    help_text = config_help(width=10_000)
    line = next(x for x in help_text.splitlines() if "rollout.backend (" in x)
    assert f"({'|'.join(BACKENDS)}|module:Class," in line
    for name, t in BACKENDS.items():
        assert isinstance(t, BackendType) and t.name == name and t.description
        assert f"{name}: {t.description}" in help_text
    assert backend_class("hf") is HFBackend
    assert BACKENDS["vllm"].capabilities.sleep and not BACKENDS["hf"].capabilities.sleep
    (wrong,) = _problems({"rollout": {"backend": "trt"}})
    assert wrong == "rollout.backend: use one of hf, vllm, or a module:Class; got 'trt'"


def test_capabilities_not_names_drive_the_checks():
    """Sleep and tensor parallelism are asked of the backend type (the vllm section's keys
    read only by vllm), with the section named in each problem."""
    cfg = _cfg(backend="vllm", vllm={"enable_sleep_mode": True, "tensor_parallel_size": 2},
               resources={"num_gpus": 2})  # fmt: skip
    kind = backend_type(cfg.rollout.backend)
    assert kind.sleeps(cfg.rollout) and kind.gpus_per_engine(cfg.rollout) == 2
    assert not backend_type("hf").sleeps(cfg.rollout)
    (pipelined,) = _problems(
        {"rollout": {"backend": "vllm", "vllm": {"enable_sleep_mode": True}},
         "trainer": {"max_staleness": 1}}
    )  # fmt: skip
    assert pipelined.startswith("rollout.vllm: vllm generators cannot sleep"), pipelined


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_old_flat_vllm_keys_are_refused_naming_the_new_key(old, tmp_path):
    new, name = MOVED_KEYS[old], old.split(".")[1]
    assert new == f"rollout.vllm.{name}"
    value = getattr(VLLMConfig(), name)  # a value the new key takes
    (yaml_problem,) = _problems({"rollout": {name: value}})
    assert yaml_problem == f"{old} moved to {new}; write it there"
    path = tmp_path / "c.yaml"
    path.write_text(f"reward: {{rewards: [{{type: function, path: {REWARD[0]['path']}}}]}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"{old}={value}"])
    assert err.value.problems == [f"{old} moved to {new}; write it there"]
    assert getattr(load_config(path, [f"{new}={value}"]).rollout.vllm, name) == value


def test_a_generation_backend_of_your_own_builds_and_generates(tiny_model):
    """Named by path as a GenerationBackend subclass: the registry's defaults, its options
    in rollout.kwargs; a real Generator runs it."""
    cfg = _cfg(backend="helpers.backends:EchoBackend", kwargs={"times": 3}, max_new_tokens=4)
    gen = Generator(ModelConfig(path=tiny_model), cfg.rollout, seed=0)
    assert isinstance(gen.backend, GenerationBackend) and gen.backend.max_context() == 99
    batch = gen.generate([PromptItem(0, "1+2=")], n_samples=2)
    last = gen.tok("1+2=")["input_ids"][-1]
    assert batch.response_ids.tolist() == [[last] * 3] * 2
    assert not backend_type(cfg.rollout.backend).sleeps(cfg.rollout)


def test_a_backend_type_of_your_own_checks_its_keys_and_declares_what_it_takes():
    (bad,) = _problems({"rollout": {"backend": "helpers.backends:EchoType"}})
    assert bad == "rollout.kwargs.times: how often to echo, an integer >= 1, got None"
    cfg = _cfg(backend="helpers.backends:EchoType", kwargs={"times": 1})
    assert backend_class(cfg.rollout.backend).__name__ == "EchoBackend"
    assert backend_type(cfg.rollout.backend).sleeps(cfg.rollout)  # declared: it sleeps
    (gen,) = [n for n in role_needs(cfg, sizer=lambda p, k: _Size()) if n.role == "generator"]
    assert gen.note == "weights + echo buffers" and gen.memory_gb == pytest.approx(0.5, abs=0.01)
    (missing,) = _problems({"rollout": {"backend": "helpers.backends:Nope"}})
    assert missing.startswith("rollout.backend: 'helpers.backends:Nope'"), missing
    (wrong,) = _problems({"rollout": {"backend": "helpers.backends:NotABackend"}})
    assert "not a subclass of rlalign_ray.rollout.backend.GenerationBackend" in wrong
    (extra,) = _problems({"rollout": {"backend": "hf", "kwargs": {"times": 1}}})
    assert extra == "rollout.kwargs: the hf backend takes no kwargs; remove them"


class _Size:
    params = 1000


def test_the_registry_and_its_checks_import_no_torch():
    """The config checks read the registry: it and the checks of the built-in backends stay
    torch-free (a backend's module is imported when a generator builds it)."""
    code = (
        "import sys; from rlalign_ray.config import RolloutConfig, VLLMConfig; "
        "from rlalign_ray.rollout.backends import BACKENDS, check_backend; "
        "r = RolloutConfig(backend='vllm', vllm=VLLMConfig(kv_cache_gb=0)); "
        "assert [check_backend(r, t) for t in BACKENDS.values()][1]; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
