"""Registries of the objective's axes: advantage estimators (here) and policy losses
(``losses.POLICY_LOSSES``). Each key is a built-in name or a user's ``module:function``.

A ``Registry`` is a dict of the built-in entries (its keys are the names the config
allows, read by ``config.checks`` and ``train --help``); ``resolve(key)`` also takes a
user's ``module:NAME``, imported once per process and turned into an entry by the
registry's ``wrap`` (which checks its signature), with an error naming the key otherwise.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .advantages import (
    compute_token_rewards,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)


class Registry(dict):
    """Built-in entries by name, plus the users' ``module:NAME`` entries once resolved."""

    def __init__(self, kind: str, wrap: Callable[[str, Any], Any]):
        super().__init__()
        self.kind = kind  # what an entry is, for messages ("advantage estimator")
        self._wrap = wrap  # (key, imported object) -> entry; raises ValueError
        self._users: dict[str, Any] = {}

    def resolve(self, key: str) -> Any:
        """The entry for ``key``: a built-in name, or ``module:NAME`` imported (once) and
        wrapped. Raises ``ValueError`` saying what is wrong and what is allowed."""
        if key in self:
            return self[key]
        if key in self._users:
            return self._users[key]
        if not isinstance(key, str) or ":" not in key:
            valid = ", ".join(self)
            raise ValueError(
                f"unknown {self.kind} {key!r}; use one of {valid}, or a module:function"
            )
        module, _, name = key.partition(":")
        try:
            obj = getattr(importlib.import_module(module), name)
        except Exception as e:  # not found, or the module failed while importing
            raise ValueError(
                f"cannot import the {self.kind} {key!r} ({type(e).__name__}: {e}); check the "
                "module is importable (on PYTHONPATH, also for Ray workers) and names it"
            ) from None
        self._users[key] = entry = self._wrap(key, obj)
        return entry


def check_signature(key: str, fn: Any, kind: str, args: tuple, kwargs: dict, shape: str) -> None:
    """Raise ``ValueError`` unless ``fn(*args, **kwargs)`` binds to ``fn``'s parameters."""
    if not callable(fn):
        raise ValueError(f"the {kind} {key!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"the {kind} {key!r} must take {shape} ({e})") from None
    except ValueError:  # a builtin without a signature: called as is
        pass


# (scores, group_ids, mask, *, gamma, kl, kl_coef) -> (B, T) advantages
OutcomeFn = Callable[..., torch.Tensor]
ESTIMATOR_SHAPE = "(scores, group_ids, mask, *, gamma, kl, kl_coef) and return (B, T) advantages"


@dataclass(frozen=True)
class AdvantageEstimator:
    """Static description of one algorithm's advantage estimator.

    ``needs_critic``: a value model is trained and GAE is used.
    ``needs_groups``: several samples per prompt (n_samples > 1) are required.
    ``compute``: critic-free outcome estimator, or None when values are needed.
    ``per_sequence``: its advantages are constant along each response (one per row).
    """

    name: str
    needs_critic: bool
    needs_groups: bool
    description: str
    compute: OutcomeFn | None = field(default=None, repr=False, compare=False)
    per_sequence: bool = False


def _user_estimator(key: str, obj: Any) -> AdvantageEstimator:
    """A user's estimator: an ``AdvantageEstimator`` (critic-free), or a function with
    optional attributes ``per_sequence`` and ``needs_groups`` (default False)."""
    spec = obj if isinstance(obj, AdvantageEstimator) else None
    fn = spec.compute if spec else obj
    if spec and (fn is None or spec.needs_critic):
        raise ValueError(f"the advantage estimator {key!r} needs a compute function, no critic")
    args = (torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1, 1))
    kwargs = {"gamma": 1.0, "kl": None, "kl_coef": 0.0}
    check_signature(key, fn, "advantage estimator", args, kwargs, ESTIMATOR_SHAPE)
    if spec:
        return spec
    doc = (inspect.getdoc(fn) or key).splitlines()[0]
    per_seq, groups = getattr(fn, "per_sequence", False), getattr(fn, "needs_groups", False)
    return AdvantageEstimator(key, False, bool(groups), doc, fn, bool(per_seq))


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_seq[:, None] * mask.to(per_seq.dtype)


def _grpo(scores, group_ids, mask, *, gamma, kl, kl_coef):
    return _broadcast(group_advantages(scores, group_ids, scale_by_std=True), mask)


def _dr_grpo(scores, group_ids, mask, *, gamma, kl, kl_coef):
    return _broadcast(group_advantages(scores, group_ids, scale_by_std=False), mask)


def _rloo(scores, group_ids, mask, *, gamma, kl, kl_coef):
    return _broadcast(rloo_advantages(scores, group_ids), mask)


def _reinforce_pp(scores, group_ids, mask, *, gamma, kl, kl_coef):
    rewards = compute_token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
    return reinforce_pp_advantages(rewards, mask, gamma)


def _reinforce_pp_baseline(scores, group_ids, mask, *, gamma, kl, kl_coef):
    return reinforce_pp_baseline_advantages(scores, group_ids, mask)


ADVANTAGE_ESTIMATORS = Registry("advantage estimator", _user_estimator)
for _est in (
    AdvantageEstimator(
        "ppo", True, False, "PPO with a learned critic and GAE (Schulman et al. 2016/2017)."
    ),
    AdvantageEstimator(
        "grpo", False, True, "Group mean/std normalised outcome (Shao et al. 2024).", _grpo, True
    ),
    AdvantageEstimator(
        "dr_grpo",
        False,
        True,
        "Group mean-centred outcome, no std (Liu et al. 2025).",
        _dr_grpo,
        True,
    ),
    AdvantageEstimator(
        "rloo", False, True, "Leave-one-out group baseline (Ahmadian et al. 2024).", _rloo, True
    ),
    AdvantageEstimator(
        "reinforce_pp",
        False,
        False,
        "Discounted token returns with KL-in-reward, batch-whitened (Hu 2025).",
        _reinforce_pp,
    ),
    AdvantageEstimator(
        "reinforce_pp_baseline",
        False,
        True,
        "Group-mean baseline then batch whitening (Hu 2025).",
        _reinforce_pp_baseline,
        True,
    ),
):
    ADVANTAGE_ESTIMATORS[_est.name] = _est


def check_algorithm_name(name: str) -> AdvantageEstimator:
    """The registry entry for ``name`` (a built-in name or a user's ``module:function``);
    one that cannot be found raises ``ValueError``."""
    return ADVANTAGE_ESTIMATORS.resolve(name)


def outcome_advantages(
    name: str,
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float = 1.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Token advantages ``(B, T)`` for a critic-free estimator, dispatched via the registry.

    Shapes: ``scores`` ``(B,)``, ``group_ids`` ``(B,)`` (may be None for ``reinforce_pp``),
    ``mask`` ``(B, T)``, ``kl`` ``(B, T)`` or None.
    grpo / dr_grpo / rloo: the per-sequence advantage broadcast over T, times mask.
    reinforce_pp: ``reinforce_pp_advantages(compute_token_rewards(scores, mask, kl,
    kl_coef), mask, gamma)``. reinforce_pp_baseline: group-mean baseline then batch
    whitening. ``gamma``, ``kl`` and ``kl_coef`` are only used by reinforce_pp.
    ``ppo`` raises ``ValueError``: GAE needs values, call ``gae`` instead.
    """
    est = check_algorithm_name(name)
    if est.compute is None:
        raise ValueError(
            f"algorithm {name!r} uses a critic: GAE needs per-token values, "
            "call gae(token_rewards, values, mask, gamma, lam) instead"
        )
    if est.needs_groups and group_ids is None:
        raise ValueError(f"algorithm {name!r} needs group_ids (n_samples > 1 per prompt)")
    return est.compute(scores, group_ids, mask, gamma=gamma, kl=kl, kl_coef=kl_coef)
