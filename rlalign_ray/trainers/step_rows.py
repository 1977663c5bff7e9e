"""Per-row reading of a step's chunks: the sample ledger's rows, group-wise reward checks
and the in-flight weight-update metrics (the driver's side of ``Rollouts``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlalign_ray.pools import Chunk


def inflight_metrics(
    chunks: Sequence[Chunk], learner_version: int, rows: torch.Tensor | None
) -> dict[str, float]:
    """In-flight weight updates: ``rollout/version_lag_mean``, the learner's version minus
    the version that sampled each trained token (the mean over the response tokens of
    ``rows``, None: all), and ``rollout/inflight_loads``, the versions the step's chunks
    loaded mid-generation. Read from each chunk's info (a per-row summary of its batch's
    ``token_versions``), so no batch passes the driver."""
    sums, tokens, loads = [], [], 0
    for c in chunks:
        info = c.extra["info"]
        sums += info["token_versions"]["sum"]
        tokens += info["token_versions"]["tokens"]
        loads += info["inflight_loads"]
    total, count = torch.tensor(sums, dtype=torch.float64), torch.tensor(tokens).double()
    if rows is not None:
        total, count = total[rows], count[rows]
    mean_version = float(total.sum() / count.sum().clamp(min=1))
    return {
        "rollout/version_lag_mean": learner_version - mean_version,
        "rollout/inflight_loads": float(loads),
    }


def group_finite(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) whether every reward of each group of n adjacent samples is finite."""
    return torch.isfinite(scores.view(-1, n)).all(dim=1)


def group_spread(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) max - min reward within each group of n adjacent samples."""
    g = scores.view(-1, n)
    return g.max(dim=1).values - g.min(dim=1).values


def sample_rows(chunks: Sequence[Chunk], rows: torch.Tensor | None) -> list[dict[str, int]]:
    """The ledger of a step's trained samples (``trainer.sample_log``): per row of the
    joined chunks (those in ``rows``), its prompt's dataset index, its sample index within
    the prompt's group, the weight version and the generator that sampled it (with several
    generator pools, also its pool's name)."""
    out = [
        {
            "prompt_index": it.index,
            "sample_index": k,
            "version": c.version,
            "generator": c.actor,
            **({"pool": c.extra["pool"]} if "pool" in c.extra else {}),  # several pools
        }
        for c in chunks
        for it in c.items
        for k in range(c.n)
    ]
    return out if rows is None else [out[i] for i in rows.tolist()]
