"""Loading: YAML (with ``base:`` files) + dotted overrides -> the typed tree, validated.

Type errors (an unknown key, a string where a number goes) are reported together and stop
there; a tree that builds is then checked as a whole (``checks.validate``), an option's
value outside its ``Literal`` included, so that it is reported with every other problem."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from rlalign_ray.config.checks import validate
from rlalign_ray.config.fields import _copy, field_types, is_union
from rlalign_ray.config.tree import Config
from rlalign_ray.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, apply ``a.b=value`` overrides, build and validate the tree."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    errors: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, errors)
    cfg = _build(Config, raw, "", errors)
    if errors:
        raise ConfigError(errors)
    errors = validate(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config; ``base: other.yaml`` (relative to this file) is read first and this
    file's keys override it, section by section."""
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    if p.resolve() in seen:
        raise ConfigError([f"{p}: 'base' files include each other in a loop"])
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of sections"])
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(p.parent / str(base), seen + (p.resolve(),)), raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (the Python API)."""
    errors: list[str] = []
    cfg = _build(Config, _copy(raw), "", errors)
    errors += validate(cfg) if not errors else []
    if errors:
        raise ConfigError(errors)
    return cfg


def _apply_override(raw: dict[str, Any], item: str, errors: list[str]) -> None:
    if "=" not in item:
        errors.append(f"override {item!r}: write it as key.path=value, e.g. trainer.steps=20")
        return
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            errors.append(f"override {item!r}: {part!r} is not a section")
            return
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    types_ = field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            valid = ", ".join(types_)
            errors.append(f"{prefix}{key}: unknown key{hint} (valid keys: {valid})")
            continue
        kwargs[key] = _coerce(types_[key], value, f"{prefix}{key}", errors)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_union(tp):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:  # e.g. str | dict[str, str]: a mapping goes to the dict member
            kind = typing.get_origin(a) or a
            if isinstance(kind, type) and kind in (dict, list) and isinstance(value, kind):
                return _coerce(a, value, key, errors)
            if kind is str and isinstance(value, str):  # int | str: "auto" stays a string
                return value
        return _coerce(inner[0], value, key, errors)
    if origin is typing.Literal:
        # an option: coerced to its values' type; checks.check_options names those allowed
        return _coerce(type(args[0]), value, key, errors)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_coerce(args[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return {str(k): _coerce(args[1], v, f"{key}.{k}", errors) for k, v in value.items()}
    return _coerce_scalar(tp, value, key, errors)


def _coerce_scalar(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{key}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{key}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}: expected a string, got {value!r}")
        return ""
    return value
