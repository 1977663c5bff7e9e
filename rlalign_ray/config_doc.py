"""Every config key with its type, default and doc line, read from the dataclass tree in
``rlalign_ray/config/`` (``rlalign-ray train --help`` prints it)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from rlalign_ray.config import Config, registry_options
from rlalign_ray.rewards.types import REWARD_TYPES
from rlalign_ray.rollout.backends import BACKENDS


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # an option or null: a|b|null
        sep = "|" if any(typing.get_origin(a) is typing.Literal for a in args) else " | "
        return sep.join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if origin is typing.Literal:  # an option: its values, e.g. hf|vllm
        return "|".join(str(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _option_names(f: dataclasses.Field, tp: Any) -> str:
    """A registry's option as its names, e.g. ppo_clip|gspo|cispo|module:function ("" for
    other fields)."""
    names, registry = registry_options(f)
    if not names:
        return ""
    more = ["module:function"] if registry is not None else []
    more += ["null"] if type(None) in typing.get_args(tp) else []
    return "|".join([*names, *more])


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value)


def _reward_types() -> tuple[str, str]:
    """``reward.rewards[].type``: its values and what each is, from the registry."""
    names = "|".join([*REWARD_TYPES, "module:Class"])
    what = "; ".join(
        f"{name} ({', '.join(t.keys)}): {t.description}" for name, t in REWARD_TYPES.items()
    )
    return names, what


def _backends() -> tuple[str, str]:
    """``rollout.backend``: its values and what each is, from the registry."""
    names = "|".join([*BACKENDS, "module:Class"])
    what = "; ".join(f"{name}: {t.description}" for name, t in BACKENDS.items())
    return names, what


# Keys whose values a registry holds and describes, beyond the fields declared with
# ``doc(..., options=...)`` (``_option_names``): (values, what each is).
REGISTRY_KEYS = {"reward.rewards[].type": _reward_types, "rollout.backend": _backends}


def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` of every leaf key, depth first in declaration order.
    A list of sections (``reward.rewards``) is listed, then its items' keys as
    ``reward.rewards[].KEY``; a mapping of named sections (``pools``) as ``pools.<name>.KEY``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key, doc = hints[f.name], prefix + f.name, f.metadata.get("doc", "")
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, key + ".")
            continue
        tp_name = _option_names(f, tp) or _type_name(tp)
        if key in REGISTRY_KEYS:
            tp_name, what = REGISTRY_KEYS[key]()
            doc = f"{doc}. {what}"
        out.append((key, tp_name, _show(_default(f)), doc))
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += config_keys(args[0], key + "[].")
        if typing.get_origin(tp) is dict and args and dataclasses.is_dataclass(args[1]):
            out += config_keys(args[1], key + ".<name>.")  # a mapping of named sections
    return out


def config_help(width: int = 100) -> str:
    """The keys as text: a section header per top-level section, one line per key."""
    import textwrap

    lines = ["config keys (set in the YAML file, or on the command line as key.path=value):"]
    section = None
    for key, tp, default, doc in config_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"{top}:"]
        head = f"  {key} ({tp}, default {default})"
        lines.append(head)
        lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
