"""The typed batches that cross actor boundaries.

A generator returns one ``RolloutBatch`` per shard of prompts; reward actors return a
``ScoredShard`` for it; the reference actor returns its log-probs. The learner gets the
shards' object refs and concatenates them itself, so token batches never pass through
the driver.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from rlalign_ray.data.items import PromptItem  # noqa: F401 (defined there, torch-free)

# ---- crossing process boundaries ---------------------------------------------------------
# Torch pickles a tensor through torch.save (~0.2 ms of CPU each way, even for a few bytes);
# a numpy array pickles in a few microseconds and Ray moves its buffer out of band. What the
# driver sends and receives every step (scores, advantages, row indices) goes the fast way.
_NUMPY_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
}  # fmt: skip


class _Packed:
    """A CPU tensor that pickles as a numpy array and unpickles as a tensor again."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __reduce__(self):
        return _unpack, (self.t.numpy(),)


def _unpack(a: Any) -> torch.Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def packed(x: Any) -> Any:
    """``x`` ready to cross a process boundary: a CPU tensor (of a dtype numpy has, without
    grad) travels as a numpy array and arrives as an equal tensor; anything else as is."""
    if (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dtype in _NUMPY_DTYPES
        and not x.requires_grad
    ):
        return _Packed(x)
    return x


def _packed_fields(obj: Any) -> tuple[Any, ...]:
    """``__reduce__`` of a batch dataclass: its fields with tensors (also in dicts) packed."""
    values = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        values[f.name] = {k: packed(x) for k, x in v.items()} if isinstance(v, dict) else packed(v)
    return _rebuild, (type(obj), values)


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    return cls(**values)


@dataclass
class RolloutBatch:
    """B sampled sequences: P prompt tokens (left-padded) + T response tokens (right-padded)."""

    # tokens
    prompt_ids: torch.Tensor  # (B, P) long, left-padded with pad_id
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    response_len: torch.Tensor  # (B,) long, tokens generated (incl. EOS when emitted)
    response_mask: torch.Tensor  # (B, T) float, 1 on tokens that count in the loss
    # policy
    logprobs: torch.Tensor  # (B, T) float, behaviour log-probs of the sampled tokens
    version: int  # weight version that produced the samples
    # outcome inputs
    group_ids: torch.Tensor  # (B,) long, the prompt's dataset index
    prompts: list[str]  # (B,) prompt text as rendered for the model
    completions: list[str]  # (B,) decoded responses, special tokens removed
    columns: dict[str, list[Any]]  # extra dataset columns, one value per sequence
    pad_id: int = 0
    truncated: torch.Tensor | None = None  # (B,) bool, hit max_new_tokens without EOS
    raw_prompts: list[Any] | None = None  # (B,) the dataset's prompts (text or messages)
    # (B, T) long, the weight version that sampled each response token, -1 on padding and
    # on tokens no model sampled (multi-turn observations); only with in-flight weight
    # updates (rollout.inflight_updates), where ``version`` is the oldest of them. None:
    # every token is ``version``'s
    token_versions: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    def __reduce__(self):
        return _packed_fields(self)

    # ---- model inputs -----------------------------------------------------------------
    def input_ids(self) -> torch.Tensor:
        """(B, P+T) prompt and response tokens."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """(B, P+T): real prompt tokens and the generated response tokens."""
        t = self.response_ids.shape[1]
        resp = (torch.arange(t)[None, :] < self.response_len[:, None]).long()
        return torch.cat([self.prompt_mask, resp], dim=1)

    # ---- reshaping --------------------------------------------------------------------
    def select(self, rows: torch.Tensor | list[int]) -> RolloutBatch:
        idx = torch.as_tensor(rows, dtype=torch.long)
        pick = idx.tolist()
        return RolloutBatch(
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            response_ids=self.response_ids[idx],
            response_len=self.response_len[idx],
            response_mask=self.response_mask[idx],
            logprobs=self.logprobs[idx],
            version=self.version,
            group_ids=self.group_ids[idx],
            prompts=[self.prompts[i] for i in pick],
            completions=[self.completions[i] for i in pick],
            columns={k: [v[i] for i in pick] for k, v in self.columns.items()},
            pad_id=self.pad_id,
            truncated=None if self.truncated is None else self.truncated[idx],
            raw_prompts=None if self.raw_prompts is None else [self.raw_prompts[i] for i in pick],
            token_versions=None if self.token_versions is None else self.token_versions[idx],
        )

    def trimmed(self) -> RolloutBatch:
        """The same rows without the padding columns no row uses (prompt columns on the
        left, response columns on the right); positions and results are unchanged."""
        p = max(int(self.prompt_mask.sum(1).max()), 1) if len(self) else 1
        t = max(int(self.response_len.max()), 1) if len(self) else 1
        p0 = self.prompt_ids.shape[1] - p
        return dataclasses.replace(
            self,
            prompt_ids=self.prompt_ids[:, p0:],
            prompt_mask=self.prompt_mask[:, p0:],
            response_ids=self.response_ids[:, :t],
            response_mask=self.response_mask[:, :t],
            logprobs=self.logprobs[:, :t],
            token_versions=None if self.token_versions is None else self.token_versions[:, :t],
        )

    def versions_per_token(self) -> torch.Tensor:
        """(B, T) ``token_versions``, or ``version`` on every generated token (-1 on padding)
        when the batch has none."""
        if self.token_versions is not None:
            return self.token_versions
        t = self.response_ids.shape[1]
        sampled = torch.arange(t)[None, :] < self.response_len[:, None]
        return torch.where(sampled, self.version, -1)

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Join shards: prompts re-padded on the left, responses on the right. Shards may
        come from different weight versions (pipelined training: a step's chunks can span a
        weight load); the joined batch carries the oldest, and each token keeps its own
        behaviour log-prob."""
        if len(batches) == 1:
            return batches[0]
        pad = batches[0].pad_id
        p = max(b.prompt_ids.shape[1] for b in batches)
        t = max(b.response_ids.shape[1] for b in batches)
        cols = {k: [x for b in batches for x in b.columns[k]] for k in batches[0].columns}
        trunc = [b.truncated for b in batches]
        raw = [b.raw_prompts for b in batches]
        versions = None  # per token only if some shard has them
        if any(b.token_versions is not None for b in batches):
            versions = torch.cat([_pad_right(b.versions_per_token(), t, -1) for b in batches])
        return RolloutBatch(
            prompt_ids=torch.cat([_pad_left(b.prompt_ids, p, pad) for b in batches]),
            prompt_mask=torch.cat([_pad_left(b.prompt_mask, p, 0) for b in batches]),
            response_ids=torch.cat([_pad_right(b.response_ids, t, pad) for b in batches]),
            response_len=torch.cat([b.response_len for b in batches]),
            response_mask=torch.cat([_pad_right(b.response_mask, t, 0) for b in batches]),
            logprobs=torch.cat([_pad_right(b.logprobs, t, 0) for b in batches]),
            version=min(b.version for b in batches),
            group_ids=torch.cat([b.group_ids for b in batches]),
            prompts=[x for b in batches for x in b.prompts],
            completions=[x for b in batches for x in b.completions],
            columns=cols,
            pad_id=pad,
            truncated=None if any(x is None for x in trunc) else torch.cat(trunc),
            raw_prompts=None if any(x is None for x in raw) else [p for r in raw for p in r],
            token_versions=versions,
        )


NONFINITE = "nonfinite"  # ScoredShard.breakdown key: 1.0 where a reward was NaN/inf


@dataclass
class ScoredShard:
    """What the reward pool returns for one RolloutBatch (small: no tokens)."""

    scores: torch.Tensor  # (B,) weighted total reward
    breakdown: dict[str, torch.Tensor]  # reward name -> (B,) unweighted values
    group_ids: torch.Tensor  # (B,) prompt index, as in the RolloutBatch
    response_len: torch.Tensor  # (B,) tokens generated
    response_mask: torch.Tensor  # (B, T) float, as in the RolloutBatch
    logprobs: torch.Tensor  # (B, T) behaviour log-probs, as in the RolloutBatch
    prompt_len: torch.Tensor | None = None  # (B,) real prompt tokens (balances packed ranks)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def row_tokens(self) -> torch.Tensor:
        """(B,) real tokens per row, prompt + response (the response alone if the prompt
        lengths are not known)."""
        return self.response_len + (0 if self.prompt_len is None else self.prompt_len)

    def __reduce__(self):
        return _packed_fields(self)

    def select(self, rows: torch.Tensor) -> ScoredShard:
        return ScoredShard(
            self.scores[rows],
            {k: v[rows] for k, v in self.breakdown.items()},
            self.group_ids[rows],
            self.response_len[rows],
            self.response_mask[rows],
            self.logprobs[rows],
            None if self.prompt_len is None else self.prompt_len[rows],
        )

    def narrow(self, width: int) -> ScoredShard:
        """The same rows with responses cut (or right-padded) to ``width`` tokens."""
        return ScoredShard(
            self.scores,
            self.breakdown,
            self.group_ids,
            self.response_len,
            _pad_right(self.response_mask[:, :width], width, 0),
            _pad_right(self.logprobs[:, :width], width, 0),
            self.prompt_len,
        )

    @staticmethod
    def concat(shards: list[ScoredShard]) -> ScoredShard:
        t = max(s.response_mask.shape[1] for s in shards)
        return ScoredShard(
            scores=torch.cat([s.scores for s in shards]),
            breakdown={k: torch.cat([s.breakdown[k] for s in shards]) for k in shards[0].breakdown},
            group_ids=torch.cat([s.group_ids for s in shards]),
            response_len=torch.cat([s.response_len for s in shards]),
            response_mask=torch.cat([_pad_right(s.response_mask, t, 0) for s in shards]),
            logprobs=torch.cat([_pad_right(s.logprobs, t, 0) for s in shards]),
            prompt_len=None
            if any(s.prompt_len is None for s in shards)
            else torch.cat([s.prompt_len for s in shards]),
        )


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ``(ids, mask)``, both (N, P) long."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def pad_responses(tensors: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Right-pad (B_i, T_i) tensors to a common T and stack them along B."""
    t = max(x.shape[1] for x in tensors)
    return torch.cat([_pad_right(x, t, value) for x in tensors])


def _pad_left(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    extra = width - x.shape[1]
    return x if extra == 0 else torch.nn.functional.pad(x, (extra, 0), value=value)


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    extra = width - x.shape[1]
    return x if extra == 0 else torch.nn.functional.pad(x, (0, extra), value=value)
