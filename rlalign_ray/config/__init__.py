"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/demo_cpu.yaml", ["trainer.steps=20", "rollout.n_samples=8"])

Every field has a one-line doc (``doc(default, "...")``). Unknown keys, wrong types and
impossible combinations are reported together, before any actor starts, as a
``ConfigError`` naming each key and how to fix it.

The modules: ``fields`` (``doc``, resources, placement), the sections (``general``: run,
model, data; ``generation``: rollout, sync, reward, env; ``training``: algorithm, learner,
critic, reference, trainer), ``tree`` (``Config``), ``loading`` (YAML, overrides, types),
``checks`` (``validate``, one check per section; the algorithm's in ``checks_algorithm``,
the roles' GPU layout checks in ``rlalign_ray.roles``).
Import from here.
"""

from rlalign_ray.config.checks import CHECKS, LOGGERS, _positive, check_options, validate
from rlalign_ray.config.fields import (
    STRATEGIES,
    DistBackend,
    Dtype,
    Placement,
    Resources,
    Strategy,
    _copy,
    doc,
    field_types,
    literal_choices,
    registry_options,
)
from rlalign_ray.config.general import DataConfig, ModelConfig, RunConfig, Truncation
from rlalign_ray.config.generation import (
    ENV_REWARD_MODES,
    NONFINITE_MODES,
    TRANSPORTS,
    EnvConfig,
    EnvRewardMode,
    NonfiniteMode,
    RewardConfig,
    RewardSpec,
    RolloutConfig,
    SyncConfig,
    Transport,
    VLLMConfig,
)
from rlalign_ray.config.loading import _build, _coerce, config_from_dict, load_config
from rlalign_ray.config.pools import PoolConfig
from rlalign_ray.config.training import (
    LR_SCHEDULERS,
    AlgorithmConfig,
    CriticConfig,
    DeepSpeedRole,
    LearnerConfig,
    LoraSpec,
    LrScheduler,
    Optimizer,
    ReferenceConfig,
    TrainerConfig,
)
from rlalign_ray.config.tree import Config

_field_types = field_types  # the name before the split

__all__ = [
    "CHECKS",
    "ENV_REWARD_MODES",
    "LOGGERS",
    "LR_SCHEDULERS",
    "NONFINITE_MODES",
    "STRATEGIES",
    "TRANSPORTS",
    "AlgorithmConfig",
    "Config",
    "CriticConfig",
    "DataConfig",
    "DeepSpeedRole",
    "DistBackend",
    "Dtype",
    "EnvConfig",
    "EnvRewardMode",
    "LearnerConfig",
    "LoraSpec",
    "LrScheduler",
    "ModelConfig",
    "NonfiniteMode",
    "Optimizer",
    "Placement",
    "PoolConfig",
    "ReferenceConfig",
    "Resources",
    "RewardConfig",
    "RewardSpec",
    "RolloutConfig",
    "RunConfig",
    "Strategy",
    "SyncConfig",
    "TrainerConfig",
    "Transport",
    "Truncation",
    "VLLMConfig",
    "check_options",
    "config_from_dict",
    "doc",
    "field_types",
    "literal_choices",
    "registry_options",
    "load_config",
    "validate",
    "_build",
    "_coerce",
    "_copy",
    "_field_types",
    "_positive",
]
