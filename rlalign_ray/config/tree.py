"""The whole config: one field per section, and the values derived from several."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rlalign_ray.config.fields import doc
from rlalign_ray.config.general import DataConfig, ModelConfig, RunConfig
from rlalign_ray.config.generation import EnvConfig, RewardConfig, RolloutConfig, SyncConfig
from rlalign_ray.config.pools import PoolConfig
from rlalign_ray.config.training import (
    AlgorithmConfig,
    CriticConfig,
    LearnerConfig,
    ReferenceConfig,
    TrainerConfig,
)


@dataclass
class Config:
    run: RunConfig = doc(RunConfig(), "cluster and seeds")
    model: ModelConfig = doc(ModelConfig(), "policy and reference models")
    data: DataConfig = doc(DataConfig(), "prompt datasets")
    rollout: RolloutConfig = doc(RolloutConfig(), "generator pool and sampling")
    reward: RewardConfig = doc(RewardConfig(), "reward pool")
    algorithm: AlgorithmConfig = doc(AlgorithmConfig(), "RL algorithm")
    learner: LearnerConfig = doc(LearnerConfig(), "DeepSpeed learner group")
    reference: ReferenceConfig = doc(ReferenceConfig(), "reference actor for the KL term")
    critic: CriticConfig = doc(CriticConfig(), "value model group (ppo only)")
    sync: SyncConfig = doc(SyncConfig(), "weight sync from the learner to the generators")
    trainer: TrainerConfig = doc(TrainerConfig(), "the driver loop")
    env: EnvConfig = doc(EnvConfig(), "environments for multi-turn rollouts (env.path)")
    pools: dict[str, PoolConfig] = doc(
        {}, "named pools beside the default ones: name -> {kind: generator or reward, ...}"
    )

    # ---- derived values, computed once -------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Sequences per step: prompts_per_step * n_samples."""
        return self.rollout.prompts_per_step * self.rollout.n_samples

    @property
    def mini_batch_size(self) -> int:
        return self.learner.mini_batch_size or self.batch_size

    @property
    def generator_dtype(self) -> str:
        """The dtype generators hold (and weights travel in)."""
        return self.rollout.dtype or self.model.dtype

    @property
    def behaviour_is_cap(self) -> float:
        """``algorithm.behaviour_is_cap`` resolved: pipelined training corrects for stale
        samples (AReaL's decoupled objective) unless told otherwise."""
        cap = self.algorithm.behaviour_is_cap
        return cap if cap is not None else (2.0 if self.pipelined else 0.0)

    @property
    def pipelined(self) -> bool:
        """Generation may run ahead of the learner: ``max_staleness`` > 0 or auto."""
        k = self.trainer.max_staleness
        return k == "auto" or (isinstance(k, int) and k > 0)

    @property
    def staleness_cap(self) -> int:
        """The most the staleness bound can ever be (auto: ``max_staleness_cap``)."""
        t = self.trainer
        return t.max_staleness_cap if t.max_staleness == "auto" else int(t.max_staleness)

    @property
    def needs_reference(self) -> bool:
        return self.algorithm.kl_coef > 0

    @property
    def needs_critic(self) -> bool:
        from rlalign_ray.algorithms import ADVANTAGE_ESTIMATORS

        est = ADVANTAGE_ESTIMATORS.get(self.algorithm.name)  # a user's estimator: no critic
        return bool(est and est.needs_critic)

    @property
    def objective(self) -> Any:
        """The objective's settings resolved (``algorithms.objective.Objective``): the
        estimator and policy loss from their registries (a user's module:function imported),
        the loss's defaults where the config says null, the KL estimator for where it goes."""
        from rlalign_ray.algorithms.objective import Objective

        return Objective.resolve(
            dataclasses.asdict(self.algorithm), self.rollout.max_new_tokens, self.behaviour_is_cap
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
