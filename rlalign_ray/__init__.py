"""rlalign-ray: align Hugging Face causal LMs with reinforcement learning on Ray.

The public Python API is ``API`` below, the one list of it: each module with the names it
offers (the Python API guide, docs/guides/python-api.md, and ``launch/examples/`` use these
only). Import a name from its module, or from here (``from rlalign_ray import Trainer``:
loaded on first use, so ``import rlalign_ray`` stays cheap). Everything else is internal and
may change; a public name that moves keeps its old import path for a release, with a
``DeprecationWarning`` (``errors.moved_module``). ``tests/unit/test_public_api.py`` imports
every name and checks the guide and the examples against this list.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

API: dict[str, tuple[str, ...]] = {
    # 1. the built-in loop, and 2. topologies: each role's pool changed from Python
    "rlalign_ray.trainers": ("Trainer",),
    "rlalign_ray.topology": ("Pool", "Topology"),
    # 3. pools: a loop of your own
    "rlalign_ray.pools": (
        "ActorPool",
        "Chunk",
        "CriticGroup",
        "EnvPool",
        "Experience",
        "Future",
        "GeneratorPool",
        "GeneratorPools",
        "LearnerGroup",
        "ReferencePool",
        "RewardPool",
        "WeightSync",
        "WeightTargets",
        "get",
        "launch",
    ),
    # the config tree
    "rlalign_ray.config": (
        "AlgorithmConfig",
        "Config",
        "CriticConfig",
        "DataConfig",
        "EnvConfig",
        "LearnerConfig",
        "LoraSpec",
        "ModelConfig",
        "Placement",
        "PoolConfig",
        "ReferenceConfig",
        "Resources",
        "RewardConfig",
        "RewardSpec",
        "RolloutConfig",
        "RunConfig",
        "SyncConfig",
        "TrainerConfig",
        "config_from_dict",
        "load_config",
        "validate",
    ),
    # what crosses the pools: prompts, sampled batches, their scores
    "rlalign_ray.data.items": ("PromptItem",),
    "rlalign_ray.data.batch": ("RolloutBatch", "ScoredShard"),
    "rlalign_ray.data.prompts": ("PromptSampler", "load_prompts"),
    # rewards: the scorer a reward actor runs, what a reward sees, reward types
    "rlalign_ray.rewards.scorer": ("RewardScorer",),
    "rlalign_ray.rewards.sources": ("RewardInputs",),
    "rlalign_ray.rewards.types": ("RewardContext", "RewardType"),
    # environments for multi-turn rollouts
    "rlalign_ray.envs": ("Env", "EnvError", "StepResult"),
    # the RL math: pure tensor functions
    "rlalign_ray.algorithms": (
        "ADVANTAGE_ESTIMATORS",
        "POLICY_LOSSES",
        "aggregate_loss",
        "compute_token_rewards",
        "gae",
        "group_advantages",
        "kl_penalty",
        "masked_mean",
        "masked_whiten",
        "outcome_advantages",
        "policy_loss",
        "reinforce_pp_advantages",
        "rloo_advantages",
        "value_loss",
    ),
    # the errors a run raises
    "rlalign_ray.errors": (
        "ActorFailure",
        "ClusterError",
        "ConfigError",
        "DataError",
        "NonFiniteError",
        "PlacementError",
        "RewardError",
        "RlalignError",
        "StorageError",
        "UserCodeError",
        "WeightSyncError",
    ),
}
_HOME = {name: module for module, names in API.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'rlalign_ray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
