"""Generation backends: what ``rollout.backend`` names, each one ``BackendType`` here.

A ``BackendType`` declares what its engine can do (``capabilities``), owns its config
section ``rollout.<section>`` (``check``: no torch, no Ray, no engine started; it is what
``check-config`` reports), checks this machine on the driver before Ray starts
(``preflight``), says what a generator of it takes besides its weights (``memory``) and
names the ``GenerationBackend`` class a generator runs (``load``, imported only then).
The config checks, the resource estimate, the preflight, ``train --help`` and the config
reference all read ``BACKENDS``; nothing else names a backend.

**Adding a backend** to the package: a ``GenerationBackend`` subclass (``rollout/``), a
``BackendType`` below naming it, one entry in ``BACKENDS``, a config section in
``config/generation.py`` if it has keys of its own, and a test.
**A backend of your own**, without touching the package: ``rollout.backend: my_module:MyBackend``
naming a ``GenerationBackend`` subclass (its options in ``rollout.kwargs``, which it reads
from the ``rollout_cfg`` it is built with), or a ``BackendType`` subclass when it needs
checks, a preflight, a memory estimate or capabilities of its own::

    class EchoType(BackendType):
        description = "echoes the prompt"
        backend = "my_module:EchoBackend"

        def check(self, rollout, key):
            return [] if rollout.kwargs.get("times") else [f"{key}.kwargs.times: required"]

This module stays torch-free (the config checks import it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from rlalign_ray.config.checks import _positive
from rlalign_ray.errors import ConfigError, UserCodeError
from rlalign_ray.roles import import_object

if TYPE_CHECKING:
    from rlalign_ray.config import RolloutConfig


@dataclass(frozen=True)
class Capabilities:
    """What a backend's engine can do, as the config checks, the resource estimate and the
    trainer ask it (never by its name)."""

    sleep: bool = False  # frees its accelerator memory while the learner trains (sleep/wake_up)
    tensor_parallel: bool = False  # one engine over several GPUs of its actor
    inflight_updates: bool = False  # loads a new version between decode steps (rollout/inflight.py)


@dataclass(frozen=True)
class Memory:
    """What one generator takes besides its weights."""

    host_gb: float = 0.0  # host RAM (e.g. a CPU engine's KV cache)
    gpu_share: float = 0.0  # share of each of its GPUs the engine takes (0: weights only)
    note: str = ""  # what was counted, e.g. "vLLM KV cache"


class BackendType:
    """One generation backend (see the module's docstring); the defaults check nothing."""

    name: ClassVar[str] = ""  # what ``rollout.backend`` says (by path: its module:Class)
    description: ClassVar[str] = ""  # one line for ``train --help`` and the config reference
    section: ClassVar[str | None] = None  # ``rollout.<section>``: its own keys (None: none)
    backend: ClassVar[str] = ""  # module:Class of the GenerationBackend a generator runs
    capabilities: ClassVar[Capabilities] = Capabilities()

    def check(self, rollout: RolloutConfig, key: str) -> list[str]:
        """Config time: the problems of its keys, each naming ``key.<field>``."""
        return []

    def preflight(self, rollout: RolloutConfig) -> None:
        """On the driver before Ray starts: raise a ``ConfigError`` naming the key and fix."""

    def sleeps(self, rollout: RolloutConfig) -> bool:
        """Whether its generators free their GPU memory while the learner trains (by
        default: whenever it can; a backend with a switch for it reads that)."""
        return self.capabilities.sleep

    def gpus_per_engine(self, rollout: RolloutConfig) -> int:
        """GPUs one engine spans (tensor parallel), which its actor must hold."""
        return 1

    def memory(self, rollout: RolloutConfig, on_gpu: bool) -> Memory:
        """What one generator takes besides its weights (``on_gpu``: it holds GPUs)."""
        return Memory()

    def load(self) -> type:
        """The ``GenerationBackend`` class (imported now)."""
        return import_object(self.backend, "class")


class HFType(BackendType):
    name = "hf"
    description = "transformers, sampled by our own KV-cached loop (rollout.micro_batch_size)"
    backend = "rlalign_ray.rollout.backend:HFBackend"
    capabilities = Capabilities(inflight_updates=True)


class VLLMType(BackendType):
    name = "vllm"
    description = "a vLLM engine per generator (keys in rollout.vllm)"
    section = "vllm"
    backend = "rlalign_ray.rollout.vllm_backend:VLLMBackend"
    capabilities = Capabilities(sleep=True, tensor_parallel=True, inflight_updates=True)

    def check(self, rollout: RolloutConfig, key: str) -> list[str]:
        e: list[str] = []
        if rollout.backend == self.name and importlib.util.find_spec("vllm") is None:
            e.append(
                f"{key}.backend: vllm is not installed; run `bash launch/install_vllm.sh` "
                "(or use rollout.backend: hf)"
            )
        v, key = rollout.vllm, f"{key}.vllm"
        _positive(e, f"{key}.tensor_parallel_size", v.tensor_parallel_size)
        if not 0 < v.gpu_memory_utilization <= 1:
            e.append(
                f"{key}.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}"
            )
        _positive(e, f"{key}.kv_cache_gb", v.kv_cache_gb)
        _positive(e, f"{key}.max_model_len", v.max_model_len, allow_zero=True)
        return e

    def sleeps(self, rollout: RolloutConfig) -> bool:
        return rollout.vllm.enable_sleep_mode

    def gpus_per_engine(self, rollout: RolloutConfig) -> int:
        return rollout.vllm.tensor_parallel_size

    def memory(self, rollout: RolloutConfig, on_gpu: bool) -> Memory:
        v = rollout.vllm
        if on_gpu:
            share = v.gpu_memory_utilization
            return Memory(gpu_share=share, note=f"vLLM takes {share:.0%} of its GPU")
        return Memory(host_gb=v.kv_cache_gb, note="vLLM KV cache")


BACKENDS: dict[str, BackendType] = {t.name: t for t in (HFType(), VLLMType())}


class _ClassType(BackendType):
    """A user's ``GenerationBackend`` subclass named by path: the defaults, and what the
    class itself declares on the interface (``inflight_updates``)."""

    def __init__(self, path: str, cls: type):
        self.backend, self._cls = path, cls
        self.capabilities = Capabilities(inflight_updates=bool(cls.inflight_updates))  # type: ignore[misc]

    def load(self) -> type:
        return self._cls


def backend_type(name: str) -> BackendType:
    """The backend ``name`` names: a key of ``BACKENDS``, or ``module:Class`` of a
    ``BackendType`` or ``GenerationBackend`` subclass (imported; the working directory is
    searched too). A ``ConfigError`` naming ``rollout.backend`` says what is wrong."""
    if name in BACKENDS:
        return BACKENDS[name]
    if not isinstance(name, str) or ":" not in name:
        raise _refused(f"use one of {', '.join(BACKENDS)}, or a module:Class; got {name!r}")
    try:
        cls = import_object(name, "class")
    except UserCodeError as e:
        raise _refused(f"{name!r} (module:Class of a backend): {e}") from None
    if isinstance(cls, type) and issubclass(cls, BackendType):
        return cls()
    if isinstance(cls, type) and _is_generation_backend(cls):
        return _ClassType(name, cls)
    raise _refused(
        f"{name!r} is a {type(cls).__name__}, not a subclass of rlalign_ray.rollout.backend."
        "GenerationBackend or rlalign_ray.rollout.backends.BackendType; point it at one"
    )


def sleeps(rollout: RolloutConfig) -> bool:
    """Whether the generators free their GPU memory while the learner trains."""
    return backend_type(rollout.backend).sleeps(rollout)


def _is_generation_backend(cls: type) -> bool:
    """Whether ``cls`` subclasses ``GenerationBackend`` (imported only for such a class: its
    module, which imports torch, is then loaded already by the user's module)."""
    module = importlib.import_module("rlalign_ray.rollout.backend")
    return issubclass(cls, module.GenerationBackend)


def _refused(why: str) -> ConfigError:
    return ConfigError([f"rollout.backend: {why}"])


def check_backend(rollout: RolloutConfig, kind: BackendType, key: str = "rollout") -> list[str]:
    """Config time: the keys of ``kind`` (the backend ``rollout.backend`` names) pass its
    ``check``, as do the sections of the built-in backends not chosen (their values are
    checked though unread); plus what its capabilities ask of the rest of ``rollout``."""
    e: list[str] = []
    for other in BACKENDS.values():
        if other is not kind and other.section:
            e += other.check(rollout, key)
        if other is not kind and other.sleeps(rollout):
            e.append(
                f"{key}.{other.section}: asks the {other.name} backend to sleep, but "
                f"rollout.backend is {rollout.backend}, which does not; set rollout.backend: "
                f"{other.name}, or turn its sleep mode off"
            )
    e += kind.check(rollout, key)
    if rollout.kwargs and rollout.backend in BACKENDS:
        e.append(f"{key}.kwargs: the {rollout.backend} backend takes no kwargs; remove them")
    tp = kind.gpus_per_engine(rollout)
    if tp > 1 and not kind.capabilities.tensor_parallel:
        e.append(
            f"rollout.backend: {rollout.backend} declares no tensor parallelism, but an "
            f"engine of it spans {tp} GPUs; declare Capabilities(tensor_parallel=True)"
        )
    elif tp > 1 and rollout.resources.num_gpus < tp:
        e.append(
            f"{key}.resources.num_gpus: each generator runs a {rollout.backend} engine over "
            f"{tp} GPUs (tensor parallel); ask for at least that many "
            f"(got {rollout.resources.num_gpus:g})"
        )
    return e
