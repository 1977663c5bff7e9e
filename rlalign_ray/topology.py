"""Topologies: for each role, which class runs, how many actors, what each needs, where.

The default topology comes from the config (``rollout``, ``reward``, ``reference``,
``learner``, ``critic`` sections: ``num_actors``/``world_size``, ``resources``,
``placement``, ``actor_class``). The Python API edits it before training:

    topo = Topology.from_config(cfg)
    topo.pools["generator"] = Pool(4, Resources(num_gpus=0.5),
                                   Placement(colocate_with="learner"))
    topo.pools["reward"].cls = MyRewardActor          # same methods as RewardScorer
    Trainer(cfg, topology=topo).fit()

A custom class is constructed like the built-in class of its role (a subclass is the
easy way) and answers the same methods; everything a YAML config can say, the API can,
and the reverse (``actor_class: my_module:MyRewardActor`` in YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from rlalign_ray.config import STRATEGIES, Config, Placement, Resources
from rlalign_ray.errors import ConfigError
from rlalign_ray.pools import CriticGroup, GeneratorPool, LearnerGroup, ReferencePool, RewardPool
from rlalign_ray.roles import DEEPSPEED_ROLES, ROLES, gpu_layout_problems, role_layout, roles_of

POOLS = {
    "generator": GeneratorPool,
    "reward": RewardPool,
    "reference": ReferencePool,
    "learner": LearnerGroup,
    "critic": CriticGroup,
}


@dataclass
class Pool:
    """One role's actors."""

    num_actors: int
    resources: Resources = field(default_factory=Resources)
    placement: Placement = field(default_factory=Placement)
    cls: type | str | None = None  # a class, "module:Class", or None: the role's built-in


@dataclass
class Topology:
    pools: dict[str, Pool]

    @classmethod
    def from_config(cls, cfg: Config) -> Topology:
        """The roles ``cfg`` needs, as its sections describe them."""
        pools = {}
        for role in roles_of(cfg):
            sec = getattr(cfg, ROLES[role].section)
            pools[role] = Pool(
                ROLES[role].num_actors(cfg),
                replace(sec.resources),
                replace(sec.placement),
                sec.actor_class,
            )
        return cls(pools)

    def validate(self, cfg: Config) -> None:
        """Roles present and consistent with the training config; raises ConfigError."""
        e: list[str] = []
        needed = set(Topology.from_config(cfg).pools)
        if needed - set(self.pools):
            e.append(f"topology: roles {sorted(needed - set(self.pools))} are missing")
        if set(self.pools) - needed - set(POOLS):
            e.append(f"topology: unknown roles {sorted(set(self.pools) - set(POOLS))}")
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
        e += gpu_layout_problems(role_layout(cfg, pools), cfg.sync)
        if e:
            raise ConfigError(e)

    def build_pools(self, cfg: Config) -> dict[str, Any]:
        """An unstarted pool (``rlalign_ray.pools``) per role, as this topology places it."""
        return {
            role: POOLS[role](cfg, pool.num_actors, pool.resources, pool.placement, pool.cls)
            for role, pool in self.pools.items()
        }
