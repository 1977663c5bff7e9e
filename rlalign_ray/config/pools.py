"""Named pools beside the default ones (``pools:``): any number of generator or reward pools,
each under its own name, which the built-in Trainer composes (every reward pool scores every
sample, weighted; every generator pool samples chunks and receives the weights)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlalign_ray.config.fields import Placement, Resources, doc
from rlalign_ray.config.generation import RewardSpec
from rlalign_ray.roles import ROLES

if TYPE_CHECKING:
    from rlalign_ray.config.tree import Config


@dataclass
class PoolConfig:
    kind: str = doc("", "the role its actors play: generator or reward (roles.ROLES)")
    num_actors: int = doc(1, "actors in the pool")
    resources: Resources = doc(Resources(), "per actor")
    placement: Placement = doc(Placement(), "where its actors go")
    actor_class: str | None = doc(None, "module:Class to run instead of the kind's built-in")
    rewards: list[RewardSpec] = doc([], "kind reward: its rewards, summed with their weights")
    weight: float = doc(1.0, "kind reward: the weight of its total in each sample's reward")


def check_pools(cfg: Config, e: list[str]) -> None:
    """Every named pool: a kind the built-in Trainer composes several of, a name of its own
    that can go in a metric's name, and keys its kind uses."""
    from rlalign_ray.rewards.types import check_reward_specs

    many = sorted(r for r, role in ROLES.items() if role.many)
    for name, p in cfg.pools.items():
        key = f"pools.{name}"
        if name in ROLES:
            e.append(
                f"{key}: {name!r} names the {name} role's default pool (configured in the "
                f"{ROLES[name].section} section); give the named pool another name"
            )
        elif not name.replace("_", "a").replace("-", "a").isalnum():
            e.append(f"{key}: a pool's name takes letters, digits, '_' and '-', got {name!r}")
        if p.kind not in ROLES:
            e.append(f"{key}.kind: unknown kind {p.kind!r}; use one of {many}")
            continue
        if not ROLES[p.kind].many:
            e.append(
                f"{key}.kind: the built-in Trainer runs one {p.kind} pool (the "
                f"{ROLES[p.kind].section} section), so no step would use a second one; "
                f"named pools may be of kind {many}"
            )
            continue
        if p.num_actors < 1:
            e.append(f"{key}.num_actors: needs at least one actor, got {p.num_actors}")
        if p.kind == "reward":
            if not p.rewards:
                e.append(f"{key}.rewards: a reward pool needs at least one reward")
            if p.weight == 0:
                e.append(f"{key}.weight: 0 leaves its scores out of every reward; no step uses it")
            e += check_reward_specs(p.rewards, f"{key}.rewards")
        elif p.rewards or p.weight != 1.0:
            what = "rewards" if p.rewards else "weight"
            e.append(f"{key}.{what}: only reward pools score; remove it from a {p.kind} pool")
