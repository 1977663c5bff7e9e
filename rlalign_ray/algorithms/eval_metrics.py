"""Evaluation metrics over k samples per prompt: pass@k (unbiased) and mean@k.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): with n
samples of a prompt of which c are correct, the probability that at least one of k samples
drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over prompts. It is unbiased for k <= n; with k = n it is the share of prompts with at
least one correct sample, with k = 1 the share of correct samples (c / n per prompt).
"""

from __future__ import annotations

import torch


def pass_at_k(n: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
    """(G,) unbiased pass@k per prompt from its sample count ``n`` and correct count ``c``.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (the numerically stable form of
    1 - C(n-c, k) / C(n, k)); prompts with fewer than k samples use their own n as k.
    """
    n = n.to(torch.float64)
    c = c.to(torch.float64)
    out = torch.empty_like(n)
    for g in range(len(n)):
        ng, cg = int(n[g]), int(c[g])
        kg = min(k, ng)
        if ng - cg < kg:  # every draw of kg samples holds a correct one
            out[g] = 1.0
            continue
        i = torch.arange(ng - cg + 1, ng + 1, dtype=torch.float64)
        out[g] = 1.0 - torch.prod(1.0 - kg / i)
    return out


def group_counts(
    scores: torch.Tensor, group_ids: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt (group id): (samples n, correct c with ``score >= threshold``, mean score)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    g = int(inverse.max()) + 1 if len(inverse) else 0
    n = torch.zeros(g, dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(scores, dtype=torch.float64)
    )
    correct = (scores >= threshold).to(torch.float64)
    c = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, correct)
    total = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, scores.to(torch.float64))
    return n, c, total / n


def pass_ks(n_samples: int) -> list[int]:
    """The k reported for ``n_samples`` samples per prompt: 1, powers of two below, and n."""
    ks, k = [], 1
    while k < n_samples:
        ks.append(k)
        k *= 2
    return ks + [n_samples]


def sample_metrics(
    scores: torch.Tensor, group_ids: torch.Tensor, n_samples: int, threshold: float
) -> dict[str, float]:
    """``pass@k`` for k in ``pass_ks(n_samples)`` and ``mean@n`` (the mean over prompts of each
    prompt's mean reward over its samples), a sample counting as correct when its reward is
    >= ``threshold``."""
    if len(scores) == 0:
        return {}
    n, c, mean = group_counts(scores, group_ids, threshold)
    out = {f"pass@{k}": float(pass_at_k(n, c, k).mean()) for k in pass_ks(n_samples)}
    out[f"mean@{n_samples}"] = float(mean.mean())
    return out
