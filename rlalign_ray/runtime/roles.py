"""The roles of a training run, derived from the config."""

from __future__ import annotations

from rlalign_ray.config import Config
from rlalign_ray.learner.critic import Critic
from rlalign_ray.learner.learner import Learner
from rlalign_ray.learner.reference import Reference
from rlalign_ray.rewards.scorer import RewardScorer
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.runtime.pools import RoleSpec

DEEPSPEED_ROLES = ("learner", "critic")  # roles whose actors form a process group


def build_roles(cfg: Config) -> list[RoleSpec]:
    """Generators, reward actors, learner ranks; the reference when KL is on; the critic
    for PPO."""
    r = cfg.rollout
    roles = [
        RoleSpec("generator", Generator, r.num_actors, r.resources,
                 args=lambda i: (cfg.model, r, cfg.run.seed, i, cfg.data.max_prompt_tokens)),
        RoleSpec("reward", RewardScorer, cfg.reward.num_actors, cfg.reward.resources,
                 args=lambda i: (cfg.reward,)),
        RoleSpec("learner", Learner, cfg.learner.world_size, cfg.learner.resources,
                 args=lambda i: (cfg, i, cfg.learner.world_size)),
    ]
    if cfg.needs_reference:
        roles.append(RoleSpec("reference", Reference, 1, cfg.reference.resources,
                              args=lambda i: (cfg.model, cfg.reference, r.temperature)))
    if cfg.needs_critic:
        roles.append(RoleSpec("critic", Critic, cfg.critic.world_size, cfg.critic.resources,
                              args=lambda i: (cfg, i, cfg.critic.world_size)))
    return roles


def cpus_needed(roles: list[RoleSpec]) -> float:
    return sum(s.num_actors * s.resources.num_cpus for s in roles)
