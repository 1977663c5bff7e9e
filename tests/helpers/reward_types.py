"""A reward type from outside the package (``type: helpers.reward_types:ContainsWord``):
what a user adds to get a kind of reward of their own, with its own options, checks,
preflight and source, without touching ``rlalign_ray``."""

from __future__ import annotations

from rlalign_ray.errors import ConfigError
from rlalign_ray.rewards.types import RewardType


class ContainsWordReward:
    """1.0 where the completion contains ``word``, else 0.0."""

    def __init__(self, name: str, word: str):
        self.name, self.word = name, word

    def __call__(self, inputs):
        return [float(self.word in text) for text in inputs.completion_texts]


class ContainsWord(RewardType):
    """Options: ``kwargs: {word: ..., column: ...}`` (``column``: a dataset column the run
    must have, to show a preflight of its own)."""

    description = "1 where the completion contains kwargs.word"
    keys = ("kwargs",)

    def check(self, spec, key):
        word = spec.kwargs.get("word")
        return [] if word else [f"{key}.kwargs.word: name the word to look for"]

    def preflight(self, spec, key, ctx):
        column = spec.kwargs.get("column")
        if column and column not in ctx.columns:
            raise ConfigError([f"{key}.kwargs.column: {ctx.dataset} has no column {column!r}"])

    def build(self, spec, device):
        return ContainsWordReward(spec.name or "contains_word", spec.kwargs["word"])


class NotAType:
    """Not a ``RewardType``: naming it as a type is a config error."""
