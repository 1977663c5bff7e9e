"""Topologies: for each role, which class runs, how many actors, what each needs, where.

The default topology comes from the config (``rollout``, ``reward``, ``reference``,
``learner``, ``critic`` sections: ``num_actors``/``world_size``, ``resources``,
``placement``, ``actor_class``). The Python API edits it before training:

    topo = Topology.from_config(cfg)
    topo.pools["generator"] = Pool(4, Resources(num_gpus=0.5),
                                   Placement(colocate_with="learner"))
    topo.pools["reward"].cls = MyRewardActor          # same methods as RewardScorer
    topo.pools["judge"] = Pool(1, kind="reward", rewards=[judge_spec], weight=0.1)
    Trainer(cfg, topology=topo).fit()

A named pool (``kind``: generator or reward; YAML ``pools:``) runs beside the default
pools: every reward pool scores every sample (its total times ``weight`` is added to the
reward), every generator pool samples chunks and receives the weights.

A custom class is constructed like the built-in class of its role (a subclass is the
easy way) and answers the same methods; everything a YAML config can say, the API can,
and the reverse (``actor_class: my_module:MyRewardActor`` in YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from rlalign_ray.config import STRATEGIES, Config, Placement, Resources, RewardSpec
from rlalign_ray.errors import ConfigError
from rlalign_ray.roles import (
    DEEPSPEED_ROLES,
    ROLES,
    gpu_layout_problems,
    pool_class,
    role_layout,
    roles_of,
)


@dataclass
class Pool:
    """One pool's actors: a role's default pool (its name is the role), or a named pool of
    ``kind`` (``pools:`` in YAML)."""

    num_actors: int
    resources: Resources = field(default_factory=Resources)
    placement: Placement = field(default_factory=Placement)
    cls: type | str | None = None  # a class, "module:Class", or None: the role's built-in
    kind: str | None = None  # a named pool's role (None: the pool's name is its role)
    rewards: list[RewardSpec] = field(default_factory=list)  # kind reward: what it scores
    weight: float = 1.0  # kind reward: its total's weight in each sample's reward

    def role(self, name: str) -> str:
        return self.kind or name


@dataclass
class Topology:
    pools: dict[str, Pool]

    @classmethod
    def from_config(cls, cfg: Config) -> Topology:
        """The roles ``cfg`` needs, as its sections describe them, and its named pools."""
        pools = {}
        for role in roles_of(cfg):
            sec = getattr(cfg, ROLES[role].section)
            pools[role] = Pool(
                ROLES[role].num_actors(cfg),
                replace(sec.resources),
                replace(sec.placement),
                sec.actor_class,
            )
        for name, p in cfg.pools.items():
            pools[name] = Pool(
                p.num_actors,
                replace(p.resources),
                replace(p.placement),
                p.actor_class,
                p.kind,
                list(p.rewards),
                p.weight,
            )
        return cls(pools)

    def of_kind(self, role: str) -> list[str]:
        """The names of the pools of ``role``, its default pool first."""
        return [n for n, p in self.pools.items() if p.role(n) == role]

    def validate(self, cfg: Config) -> None:
        """Roles present and consistent with the training config; raises ConfigError."""
        e: list[str] = []
        needed = set(roles_of(cfg))
        if needed - set(self.pools):
            e.append(f"topology: roles {sorted(needed - set(self.pools))} are missing")
        e += self._named_problems()
        for role, pool in self.pools.items():
            p = pool.placement
            if pool.num_actors < 1:
                e.append(f"{role}: needs at least one actor")
            if p.strategy not in STRATEGIES:  # Placements built in Python skip config checks
                e.append(
                    f"{role}.placement.strategy: use PACK, SPREAD, STRICT_PACK or "
                    f"STRICT_SPREAD, got {p.strategy!r}"
                )
            host = p.colocate_with
            if host is not None and (host not in self.pools or host == role):
                e.append(
                    f"{role}.placement.colocate_with: {host!r} is not another role here "
                    f"({sorted(self.pools)})"
                )
            elif host is not None and self.pools[host].placement.colocate_with:
                e.append(
                    f"{role}.placement.colocate_with: {host!r} is itself colocated; "
                    "colocate with the role that owns the bundles"
                )
        for role in DEEPSPEED_ROLES:
            if role in self.pools:
                section = getattr(cfg, role)
                unit = self.pools[role].num_actors * section.micro_batch_size
                if cfg.mini_batch_size % unit:
                    e.append(
                        f"{role}: mini-batches of {cfg.mini_batch_size} do not split over "
                        f"{self.pools[role].num_actors} ranks x micro-batches of "
                        f"{section.micro_batch_size}"
                    )
        pools = {r: (p.num_actors, p.resources, p.placement) for r, p in self.pools.items()}
        kinds = {r: p.role(r) for r, p in self.pools.items()}
        e += gpu_layout_problems(role_layout(cfg, pools), cfg.sync, kinds)
        if e:
            raise ConfigError(e)

    def _named_problems(self) -> list[str]:
        """Pools whose role is unknown, or one the built-in Trainer runs only once."""
        e: list[str] = []
        many = sorted(r for r, role in ROLES.items() if role.many)
        for name, pool in self.pools.items():
            if pool.kind is None and name not in ROLES:
                e.append(
                    f"topology: pool {name!r} is no role ({sorted(ROLES)}); give a named "
                    f"pool its kind, e.g. Pool(1, kind='reward', rewards=[...])"
                )
            elif pool.kind is not None and pool.kind not in ROLES:
                e.append(f"topology: pool {name!r}: unknown kind {pool.kind!r}; use one of {many}")
            elif pool.kind is not None and name in ROLES:
                e.append(f"topology: pool {name!r} is a role's name; name a named pool otherwise")
            elif pool.kind is not None and not ROLES[pool.kind].many:
                e.append(
                    f"topology: pool {name!r}: the built-in Trainer runs one {pool.kind} pool, "
                    f"so no step would use a second one; named pools may be of kind {many}"
                )
            elif pool.kind == "reward" and not pool.rewards and pool.cls is None:
                e.append(f"topology: reward pool {name!r} has no rewards to score with")
        return e

    def build_pools(self, cfg: Config) -> dict[str, Any]:
        """An unstarted pool (``rlalign_ray.pools``) per entry, as this topology places it."""
        out = {}
        for name, pool in self.pools.items():
            role = pool.role(name)
            args = (cfg, pool.num_actors, pool.resources, pool.placement, pool.cls, name)
            if role == "reward" and pool.kind is not None:
                reward = replace(cfg.reward, rewards=pool.rewards, actor_class=pool.cls)
                out[name] = pool_class(role)(*args, reward=reward, weight=pool.weight)
            else:
                out[name] = pool_class(role)(*args)
        return out
