"""What every section is made of: ``doc()`` fields, option types (``Literal``), a role's
resources and placement; plus the typing helpers the loader, the checks and ``train --help``
share."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def doc(default: Any, text: str, options: str | None = None) -> Any:
    """A dataclass field with a default (copied if mutable) and a one-line doc.

    ``options``: ``"module:NAME"`` of the collection whose keys are the field's allowed
    values (an option read from a registry, e.g. the policy losses), imported only when the
    config is checked or ``train --help`` prints; a registry with ``resolve`` also takes a
    user's ``module:function`` (``registry_options``)."""
    meta = {"doc": text} if options is None else {"doc": text, "options": options}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = lambda d=default: _copy(d)  # noqa: E731
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def registry_options(f: dataclasses.Field) -> tuple[tuple[str, ...], Any]:
    """``(allowed names, the registry or None)`` of a field declared with ``doc(...,
    options=...)``: the registry is returned when it resolves a user's ``module:function``
    (its ``resolve`` raises ``ValueError`` saying why a key is refused); ``((), None)`` for
    any other field. Imports the registry's module (the algorithms: torch)."""
    spec = f.metadata.get("options")
    if spec is None:
        return (), None
    module, _, name = spec.partition(":")
    registry = getattr(importlib.import_module(module), name)
    return tuple(registry), registry if hasattr(registry, "resolve") else None


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)


def field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved (the section modules use ``from __future__ import
    annotations``: their annotations, option aliases included, are strings until now, so
    an alias must be a global of the module that declares the field)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def literal_choices(tp: Any) -> tuple[tuple[Any, ...], bool]:
    """``(allowed values, null allowed)`` of an option field (``Literal[...]``, maybe
    ``| None``); ``((), False)`` for any other type."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp), False
    if is_union(tp):
        args = typing.get_args(tp)
        for a in args:
            if typing.get_origin(a) is Literal:
                return typing.get_args(a), type(None) in args
    return (), False


# Option types shared by several sections (a section's own ones live with it). A value
# outside them is reported by checks.check_options, with the values allowed.
Dtype = Literal["float32", "bfloat16", "float16"]
DistBackend = Literal["auto", "gloo", "nccl"]  # torch.distributed backend
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
STRATEGIES = typing.get_args(Strategy)


@dataclass
class Resources:
    """What one actor of a role asks Ray for."""

    num_cpus: float = doc(1.0, "logical CPUs per actor")
    num_gpus: float = doc(0.0, "GPUs per actor (fractions allowed, e.g. 0.5 to share a GPU)")
    memory_gb: float = doc(0.0, "memory to reserve per actor in GiB (0: no reservation)")
    custom: dict[str, float] = doc({}, "custom Ray resources per actor, e.g. {node_a: 1}")

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb > 0:
            opts["memory"] = int(self.memory_gb * 1024**3)
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts

    def bundle(self) -> dict[str, float]:
        b: dict[str, float] = {"CPU": self.num_cpus}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        if self.memory_gb > 0:
            b["memory"] = float(int(self.memory_gb * 1024**3))
        b.update(self.custom)
        return {k: v for k, v in b.items() if v}


@dataclass
class Placement:
    """Where a role's actors go (Ray placement groups do the scheduling)."""

    strategy: Strategy = doc(
        "PACK", "PACK (few nodes), SPREAD (across nodes), STRICT_PACK, STRICT_SPREAD"
    )
    colocate_with: str | None = doc(
        None, "share another role's bundles (same nodes, same GPUs), e.g. learner"
    )
    node_labels: dict[str, str] = doc({}, "only on nodes with these Ray node labels")
