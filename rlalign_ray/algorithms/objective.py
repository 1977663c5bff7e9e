"""The RL objective in one place: what the driver computes from a step's samples and what
each learner rank minimises. Pure tensor functions plus ``Objective``, the settings they
read (resolved once from the config: registry entries, per-loss defaults).

On the driver (``Trainer.advantages``):

1. ``shaped_scores``: DAPO's overlong penalty added to the scores.
2. ``reward_kl``: the per-token KL penalty to the reference, for the reward
   (``algorithm.kl_in_reward``), from the learner's old log-probs (the policy before the
   update, as the learner computes it: veRL and OpenRLHF do the same), k1 only: a term
   ``c_t`` in the reward reaches the gradient as ``E[c_t * grad log pi]``; for ``c = log pi -
   log pi_ref`` (k1) that is the KL's gradient, for k2, k3 or abs it is not (k3 in the reward
   drives the policy away from the reference).
3. ``advantages``: the estimator from ``ADVANTAGE_ESTIMATORS`` (GAE with the critic's
   values for ppo, then whitening), a built-in name or a user's ``module:function``.

On each learner rank (``Learner.train_step`` / ``micro_loss``):

4. ``mismatch_metrics`` and ``behaviour_correction``: the rollout/learner mismatch between
   the generator's (behaviour) log-probs and the learner's old ones: its KL, the token-level
   truncated importance weight on the advantages, the sequence-level mask.
5. ``policy_objective``: the surrogate from ``POLICY_LOSSES`` (ppo_clip, gspo, cispo or a
   user's), minus the entropy bonus, plus the KL loss term, each reduced by the same
   normaliser (``aggregate_loss``, mode ``Objective.agg``) so micro-batch weights stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .advantages import compute_token_rewards, gae, overlong_penalty
from .kl import kl_penalty
from .losses import POLICY_LOSSES, PolicyLoss
from .registry import ADVANTAGE_ESTIMATORS, AdvantageEstimator
from .utils import aggregate_loss, masked_mean, masked_whiten


@dataclass(frozen=True)
class Objective:
    """The objective's settings, resolved (``Objective.resolve`` from the config's
    ``algorithm`` values; ``Config.objective`` builds it)."""

    estimator: AdvantageEstimator  # ADVANTAGE_ESTIMATORS entry (algorithm.name)
    loss: PolicyLoss  # POLICY_LOSSES entry (algorithm.policy_loss)
    clip_low: float  # the loss's clip range, its defaults where the config says null
    clip_high: float
    dual_clip: float | None
    agg: str  # the normaliser of every loss term (aggregate_loss mode)
    max_new_tokens: int  # Dr. GRPO's constant length normaliser; the overlong limit
    entropy_coef: float = 0.0
    kl_in_reward: bool = False
    kl_estimator: str = "k3"  # for where the KL goes: null resolves to k1 / k3
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # ppo: whiten GAE advantages
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    is_cap: float = 0.0  # token-level truncated IS weight cap (0: off)
    seq_mask: tuple[float, float] | None = None  # sequence-level IS mask [lo, hi]

    @classmethod
    def resolve(cls, algorithm: dict[str, Any], max_new_tokens: int, is_cap: float) -> Objective:
        """From the ``algorithm`` section's values (a dict): the registries' entries (a
        user's ``module:function`` imported), null clip ranges and normaliser from the
        loss, a null ``kl_estimator`` as k1 in the reward and k3 as a loss term."""
        a = algorithm
        loss = POLICY_LOSSES.resolve(a["policy_loss"])
        seq_mask = a.get("behaviour_seq_mask") or None
        return cls(
            estimator=ADVANTAGE_ESTIMATORS.resolve(a["name"]),
            loss=loss,
            clip_low=loss.clip_low if a["clip_low"] is None else a["clip_low"],
            clip_high=loss.clip_high if a["clip_high"] is None else a["clip_high"],
            dual_clip=a["dual_clip"],
            agg=a["loss_agg"] or loss.agg,
            max_new_tokens=max_new_tokens,
            entropy_coef=a["entropy_coef"],
            kl_in_reward=a["kl_in_reward"],
            kl_estimator=a["kl_estimator"] or ("k1" if a["kl_in_reward"] else "k3"),
            gamma=a["gamma"],
            lam=a["lam"],
            whiten=a["whiten_advantages"],
            overlong_buffer=a["overlong_buffer"],
            overlong_penalty=a["overlong_penalty"],
            is_cap=is_cap,
            seq_mask=tuple(seq_mask) if seq_mask else None,
        )


# ---- 1-3. on the driver ------------------------------------------------------------------
def shaped_scores(
    o: Objective, scores: torch.Tensor, response_len: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) scores plus DAPO's overlong penalty (``overlong_penalty``; none when
    ``o.overlong_buffer`` is 0), and its mean as ``overlong_penalty``."""
    if not o.overlong_buffer:
        return scores, {}
    penalty = overlong_penalty(
        response_len, o.max_new_tokens, o.overlong_buffer, o.overlong_penalty
    )
    return scores + penalty, {"overlong_penalty": float(penalty.mean())}


def reward_kl(
    old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """(B, T) per-token KL penalty for the reward: ``kl_penalty(old_logp, ref_logp, kind) *
    mask``, ``old_logp`` the policy's log-probs of the sampled tokens before the update.

    Only k1 (``log pi - log pi_ref``) gives the KL-regularised objective: the reward term
    reaches the gradient as ``E[k * grad log pi]``, which is ``grad KL(pi || pi_ref)`` for
    k1 only (``config.checks`` refuses the others in the reward)."""
    return kl_penalty(old_logp, ref_logp, kind) * mask


def advantages(
    o: Objective,
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages (B, T), returns (B, T) or None)`` of ``o.estimator``.

    With a critic (ppo): ``gae(compute_token_rewards(scores, mask, kl, kl_coef), values)``,
    whitened over the batch when ``o.whiten``. Otherwise the estimator's ``compute(scores,
    group_ids, mask, gamma=, kl=, kl_coef=)`` (``kl`` reaches estimators that use it:
    reinforce_pp). An estimator that declares ``per_sequence`` must give one value per row
    (the learner receives it as one): a ``ValueError`` otherwise."""
    est = o.estimator
    if est.needs_critic:
        if values is None:
            raise ValueError(f"advantage estimator {est.name!r} needs the critic's values")
        token_rewards = compute_token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
        adv, returns = gae(token_rewards, values, mask, o.gamma, o.lam)
        if o.whiten:
            adv = masked_whiten(adv, mask) * mask
        return adv, returns
    if est.needs_groups and group_ids is None:
        raise ValueError(f"advantage estimator {est.name!r} needs group_ids (n_samples > 1)")
    adv = est.compute(scores, group_ids, mask, gamma=o.gamma, kl=kl, kl_coef=kl_coef)
    if not isinstance(adv, torch.Tensor) or adv.shape != mask.shape:
        got = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
        raise ValueError(
            f"advantage estimator {est.name!r} returned {got}; it must return a (B, T) "
            f"tensor like the mask, {tuple(mask.shape)}"
        )
    if est.per_sequence:
        first = adv.gather(1, mask.argmax(1, keepdim=True))
        if not torch.equal(adv * mask, first * mask):
            raise ValueError(
                f"advantage estimator {est.name!r} declares per_sequence but its advantages "
                "vary along a response; return one value per row (times the mask)"
            )
    return adv, None


# ---- 4-5. on each learner rank -----------------------------------------------------------
def mismatch_metrics(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float = 0.0
) -> dict[str, float]:
    """How far the generator's log-probs (behaviour) are from the learner's (old), over
    the response tokens, and the off-policy price ``trainer.max_staleness: auto`` steers by.

    Shapes: all (B, T); ``mask`` 1 on response tokens. With ``d = clamp(behaviour - old,
    -20, 20)`` (``r = exp(-d)``, the importance ratio pi_learner / pi_behaviour):
    ``logprob_mismatch`` = mean |old - behaviour|; ``mismatch_kl`` = mean k3 estimate of
    KL(behaviour || learner), ``r - 1 - log r = expm1(-d) + d`` (Schulman 2020; non-negative,
    unbiased under the behaviour's samples; in float64, so that the tiny mismatches of the
    same model do not round below 0); ``behaviour_is_clipfrac`` = the share of tokens with
    ``r > cap`` (0 when ``cap <= 0``: no weight)."""
    d = torch.clamp(behaviour_logp - old_logp, -20.0, 20.0).double()
    clipped = masked_mean((torch.exp(-d) > cap).float(), mask).item() if cap > 0 else 0.0
    return {
        "logprob_mismatch": masked_mean((old_logp - behaviour_logp).abs(), mask).item(),
        "mismatch_kl": masked_mean(torch.expm1(-d) + d, mask).item(),
        "behaviour_is_clipfrac": clipped,
    }


def behaviour_correction(
    o: Objective,
    advantages: torch.Tensor,
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """Correct for a generator that differs from the learner (numerics, staleness).

    Shapes: ``advantages`` (B,) or (B, T); the log-probs and ``mask`` (B, T). Returns
    ``(advantages, keep, metrics)``:

    * token level (``o.is_cap > 0``): ``w_t = min(exp(clamp(old - behaviour, -20, 20)),
      cap)``, advantages ``A * w`` (B, T); metric ``behaviour_is_weight`` (masked mean w).
    * sequence level (``o.seq_mask = (lo, hi)``): ``rho_i = exp(mean_t (old - behaviour))``
      over the row's tokens (the geometric mean of the token ratios, so long and short rows
      compare); ``keep`` (B,) bool, False where rho_i leaves [lo, hi]: those rows are dropped
      from the loss and its normaliser; metric ``seq_masked_frac`` (share of rows dropped).

    Off (cap 0, no mask): ``(advantages, None, {})`` unchanged."""
    metrics: dict[str, float] = {}
    keep = None
    if o.seq_mask is not None:
        lo, hi = o.seq_mask
        log_rho = masked_mean(torch.clamp(old_logp - behaviour_logp, -20, 20), mask, dim=-1)
        rho = torch.exp(log_rho)
        keep = (rho >= lo) & (rho <= hi)
        metrics["seq_masked_frac"] = float((~keep).float().mean()) if len(keep) else 0.0
    if o.is_cap > 0:
        w = torch.exp((old_logp - behaviour_logp).clamp(-20, 20)).clamp(max=o.is_cap)
        metrics["behaviour_is_weight"] = masked_mean(w, mask).item()
        advantages = (advantages[:, None] if advantages.dim() == 1 else advantages) * w
    return advantages, keep, metrics


def surrogate(
    o: Objective,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``o.loss``'s ``(loss, metrics)`` with the objective's clip range and normaliser
    (``norm_len``: ``o.max_new_tokens``); a user's loss that returns anything else is a
    ``TypeError`` naming it."""
    out = o.loss.fn(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=o.clip_low,
        clip_high=o.clip_high,
        dual_clip=o.dual_clip,
        agg=o.agg,
        norm_len=o.max_new_tokens,
    )
    ok = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)
    if not ok or not isinstance(out[0], torch.Tensor) or out[0].numel() != 1:
        raise TypeError(
            f"policy loss {o.loss.name!r} must return (loss, metrics): a one-element tensor "
            f"and a dict of floats; got {type(out).__name__}"
        )
    return out[0].reshape(()), {k: float(v) for k, v in out[1].items()}


def policy_objective(
    o: Objective,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(loss, surrogate loss, metrics)`` of one micro-batch.

    Shapes: (B, T) each (``advantages`` may be (B,)); ``entropy`` with grad when
    ``o.entropy_coef`` is set. Formula: ``loss = surrogate - entropy_coef * agg(H) +
    kl_coef * agg(kl_penalty(logp, ref_logp, o.kl_estimator))`` (the KL term only when
    ``ref_logp`` is given: KL as a loss term), every ``agg`` the same ``aggregate_loss`` mode
    ``o.agg``. Metrics: the surrogate's, ``entropy`` and (with the KL term) ``kl``, masked
    means."""
    pg_loss, m = surrogate(o, logp, old_logp, advantages, mask)
    loss = pg_loss
    logs = {"entropy": masked_mean(entropy.detach(), mask).item(), **m}
    if o.entropy_coef:
        loss = loss - o.entropy_coef * aggregate_loss(entropy, mask, o.agg, o.max_new_tokens)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, o.kl_estimator)
        loss = loss + kl_coef * aggregate_loss(kl, mask, o.agg, o.max_new_tokens)
        logs["kl"] = masked_mean(kl.detach(), mask).item()
    return loss, pg_loss, logs
