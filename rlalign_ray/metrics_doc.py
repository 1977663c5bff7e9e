"""Every metric a run logs (``metrics.jsonl`` and the other loggers), with when it appears and
a one-line meaning: the one list the metrics reference (``docs/reference/metrics.md``) is
generated from. ``tests/unit/test_docs.py`` checks it against what the code writes and a real
run's recording; the integration tests check every key their runs log with ``documented``.

A name may hold placeholders: ``<reward>`` (a reward's ``name``, or ``env``), ``<k>`` and
``<n>`` (numbers). With named eval sets (``data.eval: {NAME: path}``) every ``eval/...``
metric is logged as ``eval/NAME/...`` and ``data/eval_...`` as ``data/eval_NAME_...``.
"""

from __future__ import annotations

import re

# (name, when it is logged, what it means); grouped by prefix, in the order of a step
# fmt: off
METRICS: list[tuple[str, str, str]] = [
    # ---- rewards and responses of the step's trained samples (the driver) ----
    ("train/reward_mean", "every step", "mean total reward (the weighted sum) of the step's samples"),
    ("train/reward_std", "every step", "standard deviation of the total reward over the step's samples"),
    ("train/reward/<reward>", "every step", "mean of one reward over the samples it applies to (env: the environment's reward)"),
    ("train/reward/<pool>/<reward>", "named reward pools (pools: {<pool>: {kind: reward}})", "mean of one reward of the named reward pool <pool>, unweighted (its total times pools.<pool>.weight is added to each sample's reward)"),
    ("train/response_len", "every step", "mean response length in tokens (multi-turn: the whole trajectory after the prompt)"),
    ("train/kl_coef", "every step", "the KL coefficient used this step (changes with algorithm.kl_target)"),
    ("train/overlong_penalty", "algorithm.overlong_buffer > 0", "mean DAPO overlong penalty added to the rewards"),
    ("train/informative_groups", "algorithm.dynamic_sampling", "share of the sampled prompt groups whose rewards were not all equal"),
    ("train/refills", "algorithm.dynamic_sampling", "extra generation rounds the step needed"),
    ("train/values_mean", "ppo", "mean critic value over response tokens, before the update"),
    # ---- the policy update (learner rank 0: mean over micro-batches, then ranks) ----
    ("train/loss", "every step", "the loss of the step's optimizer steps (policy gradient, KL and entropy terms)"),
    ("train/pg_loss", "every step", "the policy-gradient (clipped surrogate) part of the loss"),
    ("train/entropy", "every step", "mean token entropy of the policy on the sampled responses"),
    ("train/clipfrac", "every step", "share of tokens where the clipped surrogate was taken"),
    ("train/approx_kl", "every step", "0.5 * mean squared log-ratio between the updated and the sampling policy"),
    ("train/ratio_mean", "every step", "mean importance ratio of the updated to the sampling policy (gspo: per sequence)"),
    ("train/dual_clipfrac", "algorithm.dual_clip (ppo_clip)", "share of tokens where the dual-clip bound was taken"),
    ("train/kl", "algorithm.kl_coef > 0", "mean per-token KL estimate to the reference (loss term, or the reward penalty with kl_in_reward)"),
    ("train/logprob_mismatch", "unless algorithm.use_behaviour_logprobs", "mean |learner log-prob - generator log-prob| of the sampled tokens before the update"),
    ("train/seq_masked_frac", "algorithm.behaviour_seq_mask", "share of rows left out of the loss because their sequence ratio pi_learner / pi_generator left [lo, hi]"),
    ("train/behaviour_is_weight", "behaviour_is_cap > 0 (pipelined runs by default)", "mean truncated importance weight min(pi_learner / pi_generator, cap)"),
    ("train/mismatch_kl", "unless algorithm.use_behaviour_logprobs", "k3 estimate of KL(behaviour || learner) over response tokens: the generator's vs the learner's log-probs before the update"),
    ("train/behaviour_is_clipfrac", "unless algorithm.use_behaviour_logprobs", "share of response tokens whose importance weight pi_learner / pi_generator exceeds behaviour_is_cap"),
    ("train/lr", "every step", "learning rate of the step's first optimizer step"),
    ("train/grad_norm", "when DeepSpeed reports one (ZeRO 1-3, bf16)", "gradient norm of the optimizer steps that were taken"),
    ("train/skipped_steps", "every step", "optimizer steps skipped for a non-finite loss or gradient norm"),
    # ---- the critic update (ppo) ----
    ("critic/value_loss", "ppo", "the (clipped) value loss"),
    ("critic/vf_clipfrac", "ppo with critic.value_clip", "share of tokens where the clipped value loss was taken"),
    ("critic/values_mean", "ppo", "mean value prediction over response tokens during the update"),
    ("critic/lr", "ppo", "critic learning rate of the step's first optimizer step"),
    ("critic/skipped_steps", "ppo", "critic optimizer steps skipped for a non-finite loss or gradient norm"),
    # ---- non-finite rewards ----
    ("reward/nonfinite", "a NaN/inf reward with reward.on_nonfinite zero or drop_group", "samples whose reward was NaN or infinite (or that no reward applied to)"),
    ("reward/dropped_groups", "as reward/nonfinite", "prompt groups left out of the step for a non-finite reward (drop_group)"),
    # ---- weights ----
    ("weights/version", "every step (and step 0)", "the weight version generators hold after the step: the number of updates so far"),
    ("weights/bytes", "every step", "bytes of weights sent to the generators"),
    # ---- pipelining and staleness ----
    ("rollout/staleness_mean", "every step", "mean of (learner version - version that sampled each trained sample)"),
    ("rollout/staleness_max", "every step", "largest such age; at most trainer.max_staleness"),
    ("rollout/dropped_stale", "every step", "samples dropped (and sampled again) for being too stale"),
    ("rollout/versions", "every step", "distinct weight versions among the step's samples"),
    ("rollout/version_lag_mean", "every step, rollout.inflight_updates", "mean of (learner version - version that sampled each trained response token)"),
    ("rollout/inflight_loads", "every step, rollout.inflight_updates", "weight versions the step's chunks loaded mid-generation (between decode steps)"),
    ("rollout/max_staleness", "every step", "the staleness bound the step's requests and drops used (trainer.max_staleness, or its auto value)"),
    # ---- time ----
    ("time/step_s", "every step", "wall time of the step"),
    ("time/generate_s", "every step", "from the first chunk's submission to the last chunk's arrival"),
    ("time/reward_s", "every step", "time spent waiting for scores after generation ended"),
    ("time/learner_idle_s", "every step", "time the driver waited for the step's samples (the learner had nothing to train)"),
    ("time/train_s", "every step", "wall time of the policy (and critic) update"),
    ("time/sync_s", "every step", "wall time of publishing the new weights (synchronous: until every generator holds them)"),
    ("time/generator_idle_s", "every step", "mean seconds a generator had no chunk during the step"),
    ("time/driver_cpu_s", "every step", "CPU seconds of the driver process during the step"),
    ("time/eval_s", "evaluation steps", "wall time of the evaluation"),
    # ---- run health ----
    ("run/actor_restarts", "every step", "actors replaced so far in the run (all roles)"),
    # ---- data ----
    ("data/truncated", "data.truncation: left", "training prompts left-truncated to data.max_prompt_tokens"),
    ("data/dropped", "data.truncation: drop", "training prompts left out for being too long"),
    ("data/eval_truncated", "data.truncation: left", "held-out prompts left-truncated"),
    ("data/eval_dropped", "data.truncation: drop", "held-out prompts left out"),
    # ---- evaluation (step 0, every trainer.eval_every steps, the last step) ----
    ("eval/reward_mean", "evaluation steps", "mean total reward on the held-out prompts"),
    ("eval/reward_std", "evaluation steps", "standard deviation of the held-out total reward"),
    ("eval/reward/<reward>", "evaluation steps", "mean of one reward on the held-out prompts"),
    ("eval/reward/<pool>/<reward>", "evaluation steps, named reward pools", "mean of one reward of the named reward pool <pool> on the held-out prompts"),
    ("eval/response_len", "evaluation steps", "mean held-out response length in tokens"),
    ("eval/pass@<k>", "evaluation steps", "unbiased pass@k over trainer.eval_n_samples samples per prompt (k = 1, 2, 4, ..., n)"),
    ("eval/mean@<n>", "evaluation steps", "mean over prompts of each prompt's mean reward over its n samples"),
]
# fmt: on

_PLACEHOLDER = re.compile(r"<[a-z]+>")


def _regex(name: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(name)
    return re.compile("[^/]+".join(re.escape(p) for p in parts) + r"\Z")


_PATTERNS = [_regex(name) for name, _, _ in METRICS]


def documented(key: str) -> bool:
    """Whether a logged key is in ``METRICS`` (``step`` is the row's step; named eval sets
    are read as the unnamed set)."""
    if key == "step":
        return True
    if any(p.match(key) for p in _PATTERNS):
        return True
    eval_set = re.match(r"eval/[^/]+/(.+)\Z", key)
    if eval_set and documented(f"eval/{eval_set.group(1)}"):
        return True
    data_set = re.match(r"data/eval_[^/]+_(truncated|dropped)\Z", key)
    return bool(data_set and documented(f"data/eval_{data_set.group(1)}"))


def undocumented(keys) -> list[str]:
    """The keys of ``keys`` that ``documented`` does not know, sorted."""
    return sorted(k for k in set(keys) if not documented(k))
