"""Reward types: what ``reward.rewards[i].type`` names, each one class here that owns it all.

A ``RewardType`` says which keys of its ``reward.rewards[i]`` entry it reads (``keys``),
checks them when the config loads (``check``: no torch, no Ray, no user code run; it is
what ``check-config`` reports), checks them on the driver before Ray starts against the
dataset and this machine (``preflight``), and builds the reward source a reward actor calls
(``build``; ``components`` when the type adds more than one part to the total). The config
checks, the preflight, ``train --help`` and the config reference all read ``REWARD_TYPES``;
nothing else names a type.

**Adding a type** to the package: a subclass below, one entry in ``REWARD_TYPES`` and a test.
**A type of your own**, without touching the package: subclass ``RewardType`` in your module
and name it by path, ``type: my_module:MyType`` (it is imported wherever it is needed: the
config checks, the driver, the reward actors; a file in the working directory works, as for
reward functions). Its options go in the entry's ``kwargs`` mapping::

    class ContainsWord(RewardType):
        keys = ("kwargs",)

        def check(self, spec, key):
            return [] if spec.kwargs.get("word") else [f"{key}.kwargs.word: name the word"]

        def build(self, spec, device):
            return ContainsWordReward(spec.name or "contains_word", spec.kwargs["word"])

A source is a callable ``source(inputs: RewardInputs) -> list[float | None]`` with a
``name`` (its metric: ``train/reward/<name>``); ``rewards/sources.py`` has the built-in ones.
This module stays torch-free (the config package's checks import it); the sources are
imported inside ``build``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rlalign_ray.config.checks import _positive
from rlalign_ray.errors import ConfigError, RewardError, UserCodeError
from rlalign_ray.roles import import_object

if TYPE_CHECKING:
    from rlalign_ray.config import RewardSpec


@dataclass
class RewardContext:
    """What a reward's preflight checks against (on the driver, before Ray starts)."""

    columns: list[str]  # the training dataset's columns (besides the prompt)
    dataset: str  # data.train, for messages
    remote: bool  # Ray Client (ray://): local paths are the cluster's, not checked here


class RewardType:
    """One kind of reward (see the module's docstring); the defaults check nothing."""

    name: ClassVar[str] = ""  # what ``type:`` says (a type named by path: its module:Class)
    description: ClassVar[str] = ""  # one line for ``train --help`` and the config reference
    keys: ClassVar[tuple[str, ...]] = ()  # the entry's keys it reads, besides name and weight

    def check(self, spec: RewardSpec, key: str) -> list[str]:
        """Config time: the problems of ``spec`` on its own, each naming ``key.<field>``."""
        return []

    def preflight(self, spec: RewardSpec, key: str, ctx: RewardContext) -> None:
        """On the driver before Ray starts: raise a ``ConfigError`` or ``RewardError``
        naming ``key.<field>`` and the fix."""

    def build(self, spec: RewardSpec, device: Any) -> Any:
        """In a reward actor: the source to call (``device``: the actor's torch device)."""
        raise NotImplementedError(f"reward type {type(self).__name__} builds no reward")

    def components(self, spec: RewardSpec, device: Any) -> list[tuple[Any, float]]:
        """``(source, weight)`` of each part of the total this entry adds: by default its
        reward with ``spec.weight``."""
        return [(self.build(spec, device), spec.weight)]


class FunctionType(RewardType):
    name = "function"
    description = "a Python function, module:function, called as TRL calls one"
    keys = ("path",)

    def check(self, spec: RewardSpec, key: str) -> list[str]:
        if not spec.path:
            return [f"{key}.path: required (module:function or a model path)"]
        if ":" not in spec.path:
            return [f"{key}.path: a function reward is 'module:function', got {spec.path!r}"]
        return []

    def preflight(self, spec: RewardSpec, key: str, ctx: RewardContext) -> None:
        check_reward_function(f"{key}.path", spec.path, ctx.columns)

    def build(self, spec: RewardSpec, device: Any) -> Any:
        from rlalign_ray.rewards.sources import FunctionReward

        return FunctionReward(spec)


class ModelType(RewardType):
    name = "model"
    description = "a sequence classifier (a model folder or hub id): its first logit"
    keys = ("path", "batch_size")

    def check(self, spec: RewardSpec, key: str) -> list[str]:
        return [] if spec.path else [f"{key}.path: required (module:function or a model path)"]

    def preflight(self, spec: RewardSpec, key: str, ctx: RewardContext) -> None:
        if not ctx.remote:
            from rlalign_ray.models.loading import check_model_path

            check_model_path(f"{key}.path", spec.path)

    def build(self, spec: RewardSpec, device: Any) -> Any:
        from rlalign_ray.rewards.sources import ModelReward

        return ModelReward(spec, device)


class EmbeddingType(ModelType):
    name = "embedding"
    description = "cosine similarity of the completion and the reference_key column"
    keys = ("path", "reference_key", "batch_size")

    def build(self, spec: RewardSpec, device: Any) -> Any:
        from rlalign_ray.rewards.sources import EmbeddingReward

        return EmbeddingReward(spec, device)


class HttpType(RewardType):
    name = "http"
    description = "a remote scorer: batches POSTed as JSON to url"
    keys = ("url", "timeout_s", "retries", "token_env", "batch_size")

    def check(self, spec: RewardSpec, key: str) -> list[str]:
        e: list[str] = []
        if not spec.url.startswith(("http://", "https://")):
            e.append(
                f"{key}.url: an http reward needs an http:// or https:// URL, got {spec.url!r}"
            )
        _positive(e, f"{key}.timeout_s", spec.timeout_s)
        _positive(e, f"{key}.retries", spec.retries, allow_zero=True)
        _positive(e, f"{key}.batch_size", spec.batch_size)
        return e

    def preflight(self, spec: RewardSpec, key: str, ctx: RewardContext) -> None:
        if spec.token_env and not ctx.remote and not os.environ.get(spec.token_env):
            raise ConfigError(
                [
                    f"{key}.token_env: the environment variable {spec.token_env!r} (the "
                    f"bearer token for {spec.url}) is not set; export it before starting "
                    "the run, or set token_env: ''"
                ]
            )

    def build(self, spec: RewardSpec, device: Any) -> Any:
        from rlalign_ray.rewards.sources import HttpReward

        return HttpReward(spec)


class MathType(RewardType):
    name = "math"
    description = "the final answer checked against the answer_key column with math-verify"
    keys = ("answer_key", "format_weight")

    def check(self, spec: RewardSpec, key: str) -> list[str]:
        e: list[str] = []
        if importlib.util.find_spec("math_verify") is None:
            e.append(
                f"{key}.type: math checks answers with the math-verify library, which is not "
                "installed; pip install 'rlalign-ray[math]' (on every node)"
            )
        if not spec.answer_key:
            e.append(
                f"{key}.answer_key: name the dataset column with the gold answers, e.g. answer"
            )
        if spec.path:
            e.append(f"{key}.path: a math reward takes no path (it reads answer_key); remove it")
        return e

    def preflight(self, spec: RewardSpec, key: str, ctx: RewardContext) -> None:
        if spec.answer_key not in ctx.columns:
            raise ConfigError(
                [
                    f"{key}.answer_key: the math reward compares with the column "
                    f"{spec.answer_key!r}, which {ctx.dataset} lacks (its columns: "
                    f"{ctx.columns}); set answer_key to the column that holds the gold answers"
                ]
            )

    def build(self, spec: RewardSpec, device: Any) -> Any:
        from rlalign_ray.rewards.math_answer import MathReward

        return MathReward(spec)

    def components(self, spec: RewardSpec, device: Any) -> list[tuple[Any, float]]:
        """The answer's correctness, and its format (``<name>_format``, ``format_weight``)."""
        from rlalign_ray.rewards.math_answer import MathFormatReward

        return [
            (self.build(spec, device), spec.weight),
            (MathFormatReward(spec), spec.format_weight),
        ]


REWARD_TYPES: dict[str, RewardType] = {
    t.name: t for t in (FunctionType(), ModelType(), EmbeddingType(), HttpType(), MathType())
}


def reward_type(name: str) -> RewardType:
    """The type ``name`` names: a key of ``REWARD_TYPES``, or ``module:Class`` of a
    ``RewardType`` subclass (imported; the working directory is searched too). A
    ``RewardError`` says what is wrong."""
    if name in REWARD_TYPES:
        return REWARD_TYPES[name]
    if ":" not in name:
        raise RewardError(f"use one of {', '.join(REWARD_TYPES)}; got {name!r}")
    try:
        cls = import_object(name, "class")
    except UserCodeError as e:
        raise RewardError(f"{name!r} (module:Class of a RewardType): {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, RewardType)):
        raise RewardError(
            f"{name!r} is a {type(cls).__name__}, not a subclass of "
            "rlalign_ray.rewards.types.RewardType; point it at one"
        )
    return cls()


def check_reward_specs(specs: list[RewardSpec], prefix: str = "reward.rewards") -> list[str]:
    """Config time: every entry's type exists and passes its own ``check``."""
    e: list[str] = []
    for i, spec in enumerate(specs):
        key = f"{prefix}[{i}]"
        try:
            kind = reward_type(spec.type)
        except RewardError as err:
            e.append(f"{key}.type: {err}")
            continue
        if spec.kwargs and "kwargs" not in kind.keys:
            e.append(f"{key}.kwargs: a {spec.type} reward takes no kwargs; remove them")
        e += kind.check(spec, key)
    return e


def preflight_rewards(
    specs: list[RewardSpec], ctx: RewardContext, prefix: str = "reward.rewards"
) -> None:
    """On the driver before Ray starts: every entry's own ``preflight``."""
    for i, spec in enumerate(specs):
        reward_type(spec.type).preflight(spec, f"{prefix}[{i}]", ctx)


def check_reward_function(key: str, path: str, columns: list[str]) -> None:
    """``path`` imports and can be called as TRL calls reward functions: with the keywords
    ``prompts``, ``completions``, ``completion_ids``, ``trainer_state`` and one per column."""
    from rlalign_ray.rewards.sources import RESERVED, import_function

    try:
        fn = import_function(path)
    except RewardError as e:
        raise RewardError(f"{key}: {e}") from None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to check
    name = path.rpartition(":")[2]
    try:
        sig.bind(**{k: None for k in RESERVED}, **{c: [None] for c in columns})
    except TypeError as e:
        raise RewardError(
            f"{key}: reward function {path!r} cannot be called as TRL calls reward functions, "
            f"with the keywords {', '.join(RESERVED)} and the dataset's columns {columns} "
            f"({e}); add **kwargs to take the ones it does not use, e.g. "
            f"def {name}(completions, **kwargs) -> list[float]"
        ) from None
