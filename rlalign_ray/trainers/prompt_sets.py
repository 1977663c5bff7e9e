"""The run's prompt sets as the config names them: ``data.train`` and ``data.eval`` (one
file, or named sets), loaded with errors that name the config key."""

from __future__ import annotations

from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.data.prompts import load_prompts
from rlalign_ray.errors import DataError


def eval_sets(cfg: Config) -> dict[str, list[PromptItem]]:
    """``data.eval`` loaded: a single file as the set "" (metrics ``eval/...``), a mapping
    name -> file as named sets (``eval/<name>/...``); {} without evaluation."""
    d = cfg.data
    if not d.eval:
        return {}
    if isinstance(d.eval, str):
        return {"": prompt_set("data.eval", d.eval, d.prompt_key, d.eval_limit)}
    return {
        name: prompt_set(f"data.eval.{name}", path, d.prompt_key, d.eval_limit)
        for name, path in d.eval.items()
    }


def prompt_set(key: str, path: str, prompt_key: str, limit: int = 0) -> list[PromptItem]:
    """``load_prompts``, its errors prefixed with the config key that named the file."""
    try:
        return load_prompts(path, prompt_key, limit)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
