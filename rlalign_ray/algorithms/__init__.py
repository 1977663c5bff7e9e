"""Pure-tensor RL math for RLHF: advantages, KL estimators and PPO-family losses.

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
from .losses import policy_loss, value_loss
from .registry import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    check_algorithm_name,
    outcome_advantages,
)
from .staleness import StalenessController, off_policy_price
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
    "AdaptiveKLController",
    "AdvantageEstimator",
    "FixedKLController",
    "aggregate_loss",
    "check_algorithm_name",
    "compute_token_rewards",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "outcome_advantages",
    "overlong_penalty",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "StalenessController",
    "off_policy_price",
    "rloo_advantages",
    "value_loss",
]
