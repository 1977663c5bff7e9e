"""The ``algorithm`` section's checks: the objective's settings against the registries
(``rlalign_ray.algorithms``, imported when checking) and combinations whose math is wrong
(``checks.validate`` runs them with the others)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlalign_ray.config.tree import Config


def check_algorithm(cfg: Config, e: list[str]) -> None:
    from rlalign_ray.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    a, r = cfg.algorithm, cfg.rollout
    est = _entry(ADVANTAGE_ESTIMATORS, a.name)  # None: named by check_options
    if est and est.needs_groups and r.n_samples < 2:
        e.append(
            f"rollout.n_samples: {a.name} compares samples within a prompt's group, so it "
            f"needs n_samples >= 2 (got {r.n_samples})"
        )
    if a.use_behaviour_logprobs and cfg.pipelined:
        e.append(
            "algorithm.use_behaviour_logprobs: pipelined training (trainer.max_staleness > "
            "0) needs the learner's own old log-probs to correct for stale samples; set "
            "it to false"
        )
    if a.behaviour_is_cap is not None and a.behaviour_is_cap < 0:
        e.append(f"algorithm.behaviour_is_cap: must be >= 0 (0: off), got {a.behaviour_is_cap}")
    _check_seq_mask(cfg, e)
    loss = _entry(POLICY_LOSSES, a.policy_loss)
    if a.dual_clip is not None and (a.dual_clip <= 1 or loss and not loss.dual_clip):
        e.append(
            f"algorithm.dual_clip: a constant > 1 (e.g. 3.0) for ppo_clip, or null (gspo and "
            f"cispo have none), got {a.dual_clip} with policy_loss {a.policy_loss}"
        )
    if a.kl_in_reward and est and est.per_sequence:
        e.append(
            f"algorithm.kl_in_reward: {a.name} scores whole sequences; use the KL loss "
            "term (kl_in_reward: false), or ppo / reinforce_pp"
        )
    if a.overlong_buffer >= r.max_new_tokens:
        e.append(
            f"algorithm.overlong_buffer: must be < rollout.max_new_tokens "
            f"({r.max_new_tokens}), got {a.overlong_buffer}"
        )
    if a.kl_coef < 0:
        e.append(f"algorithm.kl_coef: must be >= 0, got {a.kl_coef}")
    if a.kl_target > 0 and a.kl_coef == 0:
        e.append(
            "algorithm.kl_target: the adaptive controller scales kl_coef, which is 0 (no "
            "reference model, no KL): set kl_coef > 0 as its starting value, or kl_target: 0"
        )


def _entry(registry: Any, key: str) -> Any:
    """The registry's entry for ``key``, or None when it does not resolve."""
    try:
        return registry.resolve(key)
    except ValueError:
        return None


def _check_seq_mask(cfg: Config, e: list[str]) -> None:
    bounds = cfg.algorithm.behaviour_seq_mask
    if not bounds:
        return
    if len(bounds) != 2 or not 0 <= bounds[0] <= 1 <= bounds[1] or bounds[0] == bounds[1]:
        e.append(
            "algorithm.behaviour_seq_mask: give [lo, hi] with 0 <= lo <= 1 <= hi, lo < hi "
            f"(a row with no mismatch has ratio 1 and is kept), e.g. [0.5, 2.0]; got {bounds}"
        )
    if cfg.algorithm.use_behaviour_logprobs:
        e.append(
            "algorithm.behaviour_seq_mask: compares the learner's log-probs with the "
            "generator's, but use_behaviour_logprobs: true makes them the same; turn one off"
        )


def check_sampling_math(cfg: Config, e: list[str]) -> None:
    """Combinations whose math is biased: truncated sampling with the generator's log-probs
    used as probabilities, and KL estimators placed where their gradient is wrong."""
    r, a = cfg.rollout, cfg.algorithm
    if r.top_p < 1 or r.top_k > 0:
        uses = []
        if a.use_behaviour_logprobs:
            uses.append(
                "algorithm.use_behaviour_logprobs (the old log-probs of the ratio and of "
                "the in-reward KL)"
            )
        if cfg.behaviour_is_cap > 0 and not a.use_behaviour_logprobs:
            uses.append(
                "algorithm.behaviour_is_cap (the importance weight; on by default when "
                "trainer.max_staleness > 0)"
            )
        if a.behaviour_seq_mask:
            uses.append("algorithm.behaviour_seq_mask (the sequence ratio)")
        if uses:
            e.append(
                f"rollout.top_p={r.top_p:g} / rollout.top_k={r.top_k}: the generators record "
                "log-probs of the truncated distribution they sample from, while the learner "
                "scores the full softmax; " + " and ".join(uses) + " would use the truncated "
                "ones as the policy's and bias the update. Sample with top_p: 1 and top_k: 0, "
                "or turn those off (use_behaviour_logprobs: false, behaviour_is_cap: 0, "
                "behaviour_seq_mask: [])"
            )
    kl_on = a.kl_coef > 0 or a.kl_target > 0
    if kl_on and not a.kl_in_reward and a.kl_estimator == "k1":
        e.append(
            "algorithm.kl_estimator: k1 as a loss term has zero expected gradient on-policy "
            "(its gradient is the score function, whose mean is 0), so it does not pull the "
            "policy towards the reference; use k3 (GRPO's) or k2 (its gradient is the KL's) "
            "as a loss term, or k1 with kl_in_reward: true"
        )
    if kl_on and a.kl_in_reward and a.kl_estimator not in (None, "k1"):
        e.append(
            f"algorithm.kl_estimator: {a.kl_estimator} in the reward (kl_in_reward: true) "
            "does not regularise towards the reference: a reward term k reaches the gradient "
            "as E[k * grad log pi], which is the KL's gradient only for k = k1 (k2, k3 and "
            "abs push the policy away from the reference); use k1 (or null) in the reward, "
            "or k3 as a loss term (kl_in_reward: false)"
        )
