"""Checks shared by the HF and vLLM stop-string tests."""

from __future__ import annotations

from typing import Any

import torch


def pick_stop(texts: list[str]) -> str:
    """A character sampled mid-response in the most rows (a random-init model's output)."""
    return max({c for t in texts for c in t[1:6]}, key=lambda c: sum(c in t for t in texts))


def check_stopped_rows(b: Any, free: Any, stop: str, tok: Any) -> None:
    """``b`` sampled with ``stop`` and ``free`` without it, with the same seeds: each row of
    ``b`` is ``free``'s row cut after the token that completes the stop string, its text cut
    before it (vLLM's rule), nothing kept after it; at least two rows hit it."""
    hit = 0
    for i in range(len(b)):
        n, full = int(b.response_len[i]), int(free.response_len[i])
        tokens = b.response_ids[i, :n]
        assert torch.equal(tokens, free.response_ids[i, :n])  # the same samples up to the stop
        text = tok.decode(tokens, skip_special_tokens=True)
        if stop in free.completions[i]:
            hit += 1
            assert text.endswith(stop) and stop not in text[:-1]
            assert b.completions[i] == text[: -len(stop)] and not bool(b.truncated[i])
        else:
            assert n == full and b.completions[i] == free.completions[i]
        assert torch.all(b.response_mask[i, n:] == 0)
    assert hit >= 2
