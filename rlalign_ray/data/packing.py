"""Packed rows: a micro-batch laid end to end without padding, and how rows are grouped.

A packed micro-batch lays each row's p_i real prompt tokens and r_i response tokens
(``response_len``) end to end, with no pad token between them: in one sequence, or in bins of
a fixed width (``pack``). Position ids restart at 0 on every row; with no attention mask,
that is what confines each token's attention to its own row (transformers' mask builders and
flash attention's varlen path read it). The hidden state before each counted response token
is then gathered back into the (b, t) right-padded layout the losses take, so a packed
forward gives what the padded forward gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlalign_ray.data.batch import RolloutBatch


@dataclass
class PackedRows:
    """One packed micro-batch and where its response tokens are."""

    input_ids: torch.Tensor  # (k, W) long: k bins of W tokens, the rows' real tokens end
    # to end (a bin's unused tail is filler that forms a sequence of its own)
    position_ids: torch.Tensor  # (k, W) long, 0, 1, ... restarting at each row
    predictors: torch.Tensor  # (N,) long, the position (in the flattened k x W) whose
    # output predicts each counted response token, in the row-major order of ``mask``
    mask: torch.Tensor  # (b, t) bool, response_mask != 0

    @property
    def tokens(self) -> int:
        """Tokens computed (real ones and bin tails)."""
        return int(self.input_ids.numel())


def pack(batch: RolloutBatch, width: int | None = None) -> PackedRows:
    """The rows of ``batch`` packed (see the module docstring): into one sequence
    (``width`` None), or first-fit into bins of ``width`` tokens, at least the longest row's
    (0: exactly that). One sequence suits attention kernels that skip other rows' blocks
    (flash attention's varlen path); with a dense mask (sdpa, eager) attention costs the
    square of the sequence, so bins as wide as the longest row cost no more than padding.

    Each row's tokens are those of ``batch.attention_mask()`` (real prompt tokens, then the
    ``response_len`` generated ones), at the positions ``loading.position_ids`` gives them in
    the padded layout, so every row sees exactly what it sees there. Every row needs a prompt
    token (the first response token is predicted from it), and every counted response token
    must be a generated one (``response_mask`` zero from ``response_len`` on)."""
    keep = batch.attention_mask() != 0  # (b, P+T)
    p = batch.prompt_ids.shape[1]
    if len(batch) and not bool(keep[:, :p].any(1).all()):
        raise ValueError("packing needs at least one prompt token in every row")
    mask = batch.response_mask != 0
    if bool((mask & ~keep[:, p:]).any()):
        raise ValueError("response_mask counts tokens past response_len; they cannot be packed")
    sizes = keep.sum(1).tolist()
    w = sum(sizes) if width is None else max(width, *sizes)
    tokens = batch.input_ids()
    start = torch.zeros(len(batch), dtype=torch.long)  # each row's first index, flattened
    ids, positions = [], []
    for k, rows in enumerate(budget_groups(sizes, w)):
        end, parts, pos = k * w, [], []
        for i in rows:
            start[i], end = end, end + sizes[i]
            parts.append(tokens[i][keep[i]])
            pos.append(torch.arange(sizes[i]))
        tail = (k + 1) * w - end  # filler: a sequence of its own (positions from 0)
        parts.append(torch.full((tail,), batch.pad_id, dtype=torch.long))
        pos.append(torch.arange(tail))
        ids.append(torch.cat(parts))
        positions.append(torch.cat(pos))
    first = start + keep[:, :p].sum(1) - 1  # predicts each row's first response token
    return PackedRows(
        input_ids=torch.stack(ids),
        position_ids=torch.stack(positions),
        predictors=(first[:, None] + torch.arange(mask.shape[1]))[mask],
        mask=mask,
    )


def row_tokens(batch: RolloutBatch) -> torch.Tensor:
    """(B,) long: each row's real tokens, prompt + response (what packing computes)."""
    return batch.prompt_mask.sum(1) + batch.response_len


def budget_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped so each group's total is at most ``budget``
    (first-fit decreasing; a single longer item is a group of its own); each group sorted.

    >>> budget_groups([5, 2, 7, 1, 3], 8)
    [[2, 3], [0, 4], [1]]
    """
    groups: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):  # stable: ties by index
        fit = next((g for g, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            groups.append([i])
            room.append(budget - lengths[i])
        else:
            groups[fit].append(i)
            room[fit] -= lengths[i]
    return [sorted(g) for g in groups]


def token_groups(
    prompt_len: torch.Tensor, response_len: torch.Tensor, budget: int, packed: bool
) -> list[list[int]]:
    """Indices of rows (of these (n,) prompt and response lengths) grouped into micro-batches
    of at most ``budget`` tokens: real ones when ``packed`` (``budget_groups``), else as
    padded to the group's longest prompt and response (rows longest first, each joining the
    last group while that fits). A longer row is a group of its own."""
    if packed:
        return budget_groups((prompt_len + response_len).tolist(), budget)
    groups: list[list[int]] = []
    width = (0, 0)  # the current group's longest prompt and response
    for i in torch.argsort(prompt_len + response_len, descending=True, stable=True).tolist():
        grown = (max(width[0], int(prompt_len[i])), max(width[1], int(response_len[i])))
        if groups and (len(groups[-1]) + 1) * sum(grown) <= budget:
            groups[-1].append(i)
            width = grown
        else:
            groups.append([i])
            width = (int(prompt_len[i]), int(response_len[i]))
    return [sorted(g) for g in groups]


def split_largest(groups: list[list[int]], lengths: Any, count: int) -> list[list[int]]:
    """Split groups of items (the group with the most tokens among those of two or more
    items, into two halves of about equal tokens) until there are ``count`` of them; needs
    ``count`` <= the number of items. ``lengths[i]``: item i's tokens (a list or a dict)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        big = max(
            (k for k in range(len(groups)) if len(groups[k]) > 1),
            key=lambda k: sum(lengths[i] for i in groups[k]),
        )
        halves: tuple[list[int], list[int]] = ([], [])
        for i in sorted(groups[big], key=lambda k: -lengths[k]):  # longest first, to the lighter
            light = min(halves, key=lambda h: (sum(lengths[j] for j in h), len(h)))
            light.append(i)
        groups[big : big + 1] = [sorted(halves[0]), sorted(halves[1])]
    return groups
