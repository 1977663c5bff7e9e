"""The learner's data plumbing without Ray or DeepSpeed: the per-rank split and token-budget
micro-batches."""

from __future__ import annotations

import torch

from rlalign_ray.config import config_from_dict
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.learner.base import DeepSpeedRank, rank_batches
from rlalign_ray.roles import split_rows

REWARD = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]


def _shard(plen: list[int], rlen: list[int], first: int) -> RolloutBatch:
    n, p, t = len(plen), max(plen), max(rlen)
    plen_t, rlen_t = torch.tensor(plen), torch.tensor(rlen)
    rows = torch.arange(first, first + n)[:, None].float()
    return RolloutBatch(
        prompt_ids=torch.ones(n, p, dtype=torch.long),
        prompt_mask=(torch.arange(p)[None, :] >= p - plen_t[:, None]).long(),
        response_ids=torch.ones(n, t, dtype=torch.long),
        response_len=rlen_t,
        response_mask=(torch.arange(t)[None, :] < rlen_t[:, None]).float(),
        logprobs=rows.expand(n, t).clone(),  # each row's index, to follow rows around
        version=0,
        group_ids=torch.arange(first, first + n),
        prompts=[""] * n,
        completions=[""] * n,
        columns={},
    )


def test_each_rank_gets_its_rows_and_reference_logprobs():
    shards = [_shard([3, 2, 4], [5, 1, 2], 0), _shard([2, 2, 1], [2, 6, 3], 3)]
    refs = [s.logprobs * 10 for s in shards]
    keep = torch.tensor([0, 1, 2, 4, 5, 3])  # a dynamic-sampling selection of 6 rows
    parts = split_rows(len(keep), 2, seed=0, step=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(6))
    assert [p.tolist() for p in parts] == [p.tolist() for p in split_rows(6, 2, seed=0, step=3)]
    out = rank_batches(parts, keep, len(shards), *shards, *refs)
    for (batch, ref), rows in zip(out, parts):
        assert batch.group_ids.tolist() == keep[rows].tolist()
        assert batch.response_ids.shape[1] == 6  # the joined width; micro-batches trim it
        torch.testing.assert_close(ref, batch.logprobs * 10)


def test_token_budget_micro_batches_fit_and_cover_the_rows():
    cfg = config_from_dict(
        {
            "reward": {"rewards": REWARD},
            "data": {"max_prompt_tokens": 4},
            "rollout": {"max_new_tokens": 6},
            "learner": {"max_tokens_per_micro_batch": 16},
        }
    )
    rank = DeepSpeedRank(cfg, 0, 1, cfg.learner)
    batch = _shard([3, 2, 4, 1, 2, 2], [5, 1, 2, 6, 2, 1], 0)
    rows = torch.tensor([5, 0, 3, 2, 1])
    micro = rank.micro_batches(batch, rows)
    assert sorted(torch.cat(micro).tolist()) == sorted(rows.tolist())
    for r in micro:
        mb = batch.select(r).trimmed()
        assert len(r) == 1 or mb.prompt_ids.numel() + mb.response_ids.numel() <= 16
    assert len(micro) < len(rows)  # short rows share a micro-batch


def test_packed_token_budget_counts_real_tokens():
    cfg = config_from_dict(
        {
            "reward": {"rewards": REWARD},
            "data": {"max_prompt_tokens": 4},
            "rollout": {"max_new_tokens": 6},
            "learner": {"max_tokens_per_micro_batch": 8, "packing": True},
        }
    )
    rank = DeepSpeedRank(cfg, 0, 1, cfg.learner)
    batch = _shard([3, 2, 4, 1, 2, 2], [5, 1, 2, 6, 2, 1], 0)  # 8, 3, 6, 7, 4, 3 tokens
    rows = torch.tensor([5, 0, 3, 2, 1, 4])
    micro = rank.lockstep_micro_batches(batch, rows)  # one rank: as micro_batches
    assert sorted(torch.cat(micro).tolist()) == list(range(6))
    tokens = [sum([8, 3, 6, 7, 4, 3][i] for i in r.tolist()) for r in micro]
    # first-fit decreasing: 8 | 7 | 6 | 4 + 3 | 3 (31 tokens need at least 4 micro-batches,
    # but no two of 8, 7 and 6 share one, and 3 + 3 + 4 > 8)
    assert all(t <= 8 for t in tokens) and sorted(tokens) == [3, 6, 7, 7, 8]
