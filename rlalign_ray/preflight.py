"""Checks the driver runs before Ray starts: what an actor would only find out minutes later.

``preflight(cfg, topology, prompts)`` checks the model path (a folder with a config.json),
the tokenizer's chat template when prompts are message lists (or ``model.chat_template``
is on), and each reward by its type's own preflight (``rewards/types.py``: a function
reward imports and can be called as TRL calls one, with the keywords ``prompts``,
``completions``, ``completion_ids``, ``trainer_state`` and the dataset's columns; a math
reward's answer column is in the dataset; an http reward's token variable is set; a reward
model's path exists). Each problem is a
``RlalignError`` that names the key and the fix. Roles that run a custom ``actor_class``
are not checked (their classes may not load the model or the rewards at all), nor are
local paths through Ray Client (``ray://``), where they are the cluster's.
"""

from __future__ import annotations

import os
from typing import Any

from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.data.render import PromptRenderer, prepare_prompts
from rlalign_ray.envs.base import EnvError, env_class
from rlalign_ray.errors import ConfigError
from rlalign_ray.models.loading import check_model_path, load_tokenizer
from rlalign_ray.rewards.sources import RESERVED
from rlalign_ray.rewards.types import RewardContext, preflight_rewards
from rlalign_ray.roles import ROLES, resolve_class
from rlalign_ray.rollout.backends import backend_type


def preflight(cfg: Config, topology: Any, prompts: list[PromptItem]) -> None:
    for key in dict.fromkeys(role.section for role in ROLES.values()):
        path = getattr(getattr(cfg, key), "actor_class", None)  # env: its own env.path
        if path:
            check_actor_class(f"{key}.actor_class", path)
    for name, pool in cfg.pools.items():
        if pool.actor_class:
            check_actor_class(f"pools.{name}.actor_class", pool.actor_class)
    builtin = {role: pool.cls is None for role, pool in topology.pools.items()}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or ""
    remote = address.startswith("ray://")  # Ray Client: the paths are the cluster's, not ours
    if builtin.get("generator") and builtin.get("learner") and not remote:
        check_model_path("model.path", cfg.model.path)
        if cfg.model.tokenizer:
            check_model_path("model.tokenizer", cfg.model.tokenizer, need_config=False)
        if cfg.model.reference:
            check_model_path("model.reference", cfg.model.reference)
        chat = cfg.model.chat_template or any(isinstance(p.prompt, list) for p in prompts)
        if chat:
            check_chat_template(cfg)
        elif cfg.model.system_prompt:
            raise ConfigError(
                [
                    "model.system_prompt: only prompts rendered with the chat template get "
                    f"it, and the prompts in {cfg.data.train} are plain text; set "
                    "model.chat_template: true, or put the instruction in the prompts"
                ]
            )
    if builtin.get("generator"):
        backend_type(cfg.rollout.backend).preflight(cfg.rollout)
    if cfg.env.path and not remote:
        try:
            env_class(cfg.env.path)
        except EnvError as e:
            raise ConfigError([str(e)]) from None
    if builtin.get("reward"):
        check_rewards(cfg, sorted(prompts[0].columns) if prompts else [], remote)


def check_rewards(cfg: Config, columns: list[str], remote: bool) -> None:
    """No dataset column shadows a reward's own arguments; then each reward's own
    preflight (its type's, ``rewards/types.py``): a function imports and takes TRL's
    keywords, a math reward's answer column is there, an http token is set, a model path
    exists."""
    clash = sorted(set(columns) & set(RESERVED))
    if clash:
        raise ConfigError(
            [
                f"{cfg.data.train}: the dataset has columns named {clash}, which rewards "
                "receive as their own arguments; rename those columns"
            ]
        )
    ctx = RewardContext(columns, cfg.data.train, remote)
    preflight_rewards(cfg.reward.rewards, ctx)
    for name, pool in cfg.pools.items():
        if pool.kind == "reward" and not pool.actor_class:
            preflight_rewards(pool.rewards, ctx, f"pools.{name}.rewards")


def check_actor_class(key: str, path: str) -> None:
    try:
        cls = resolve_class(path)
    except ConfigError as e:
        raise ConfigError([f"{key}: {p}" for p in e.problems]) from None
    if not isinstance(cls, type):
        raise ConfigError([f"{key}: {path!r} is a {type(cls).__name__}, not a class"])


def check_chat_template(cfg: Config) -> None:
    path = cfg.model.tokenizer or cfg.model.path
    key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    try:
        tok = load_tokenizer(path, cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's input
        raise ConfigError(
            [f"{key}: cannot load a tokenizer from {path!r} ({type(e).__name__}: {e})"]
        ) from None
    if getattr(tok, "chat_template", None) is None:
        why = (
            "model.chat_template is on"
            if cfg.model.chat_template
            else f"the prompts in {cfg.data.train} are lists of messages"
        )
        raise ConfigError(
            [
                f"{key}: the tokenizer at {path!r} has no chat template, but {why}; use a "
                "tokenizer with one (set model.tokenizer), or plain string prompts with "
                "model.chat_template: false"
            ]
        )


def prepare_data(
    cfg: Config, topology: Any, items: list[PromptItem], key: str = "data.train"
) -> tuple[list[PromptItem], dict[str, float]]:
    """Apply ``data.truncation`` to a dataset on the driver (``prepare_prompts``): every
    prompt rendered (chat template, ``model.chat_template_kwargs``) and measured with the
    policy's tokenizer. Skipped, returning the items unchanged, where the driver does not
    load the policy's tokenizer (a custom generator class, Ray Client); the generators then
    keep the last ``data.max_prompt_tokens`` tokens of a long prompt."""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or ""
    pool = topology.pools.get("generator")
    if address.startswith("ray://") or (pool is not None and pool.cls is not None):
        return items, {}
    m = cfg.model
    tok = load_tokenizer(m.tokenizer or m.path, m.trust_remote_code)
    renderer = PromptRenderer(
        tok, m.chat_template, m.chat_template_kwargs, cfg.data.max_prompt_tokens, m.system_prompt
    )
    return prepare_prompts(items, renderer, cfg.data.truncation, key)
