"""Pure-tensor RL math for RLHF: advantages, KL estimators, policy losses, and the
objective that composes them (``objective.py``), with the registries of estimators and
policy losses (``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``: built-in names or a user's
``module:function``).

No Ray and no config objects here; every function takes and returns tensors.
"""

from .advantages import (
    compute_token_rewards,
    gae,
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from .kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty
from .losses import (
    POLICY_LOSSES,
    PolicyLoss,
    cispo_loss,
    gspo_loss,
    policy_loss,
    register_policy_loss,
    value_loss,
)
from .objective import Objective
from .registry import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    Registry,
    check_algorithm_name,
    outcome_advantages,
)
from .staleness import StalenessController
from .utils import (
    AGGREGATION_MODES,
    aggregate_loss,
    entropy_from_logits,
    masked_mean,
    masked_whiten,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "KL_KINDS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "FixedKLController",
    "Objective",
    "PolicyLoss",
    "Registry",
    "aggregate_loss",
    "check_algorithm_name",
    "cispo_loss",
    "compute_token_rewards",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "gspo_loss",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "outcome_advantages",
    "overlong_penalty",
    "policy_loss",
    "register_policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "StalenessController",
    "rloo_advantages",
    "value_loss",
]
