"""A user's policy loss and advantage estimator, named in a config by module path
(``algorithm.policy_loss: helpers.objectives:reinforce_loss``, ``algorithm.name:
helpers.objectives:median_baseline``); docs/guides/objectives.md shows them."""

from __future__ import annotations

import torch

from rlalign_ray.algorithms import aggregate_loss, masked_mean


def reinforce_loss(logp, old_logp, advantages, mask, *, agg, norm_len, **settings):
    """REINFORCE with the importance ratio, no clipping: ``-A * exp(logp - old_logp)``.

    logp, old_logp, mask: (B, T); advantages: (B,) or (B, T). ``settings`` holds the
    clip range and dual clip, unused here. Returns (0-dim loss, metrics of floats)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    loss = aggregate_loss(-advantages * ratio, mask, agg, norm_len)
    return loss, {"ratio_mean": masked_mean(ratio.detach(), mask).item()}


def median_baseline(scores, group_ids, mask, *, gamma, kl, kl_coef):
    """Each sample's score minus its group's median (scores (B,), group_ids (B,), mask
    (B, T)); one value per row, broadcast over the response: (B, T)."""
    adv = torch.zeros_like(scores, dtype=torch.float32)
    for g in torch.unique(group_ids):
        rows = group_ids == g
        adv[rows] = scores[rows].float() - scores[rows].float().median()
    return adv[:, None] * mask


median_baseline.per_sequence = True  # constant along each response
median_baseline.needs_groups = True  # several samples per prompt


def wrong_signature(logp, old_logp):
    """Not a policy loss: it lacks the advantages and the mask."""
    return logp.sum(), {}
