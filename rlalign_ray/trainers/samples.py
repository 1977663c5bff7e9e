"""Per-sample rows for ``trainer.log_completions``: prompt and completion text with the rewards.

The driver holds only each step's scores (``ScoredShard``: no tokens, no text); the text lives
in the generators' ``RolloutBatch`` shards in Ray's object store. Only the shards that hold the
logged rows are fetched (usually the first), so the cost stays one chunk per step.
"""

from __future__ import annotations

from typing import Any

from rlalign_ray.pools import Experience
from rlalign_ray.runtime.placement import get


def completion_rows(exp: Experience, n: int, timeout_s: float) -> list[dict[str, Any]]:
    """The first ``n`` samples of the step's batch (whole prompt groups first): ``prompt``,
    ``completion``, ``reward`` (the weighted total), ``reward/<name>`` per reward,
    ``response_len``."""
    s = exp.scores
    n = min(n, len(s))
    if n <= 0:
        return []
    where = [int(exp.rows[j]) if exp.rows is not None else j for j in range(n)]
    need, texts, offset = max(where), {}, 0
    for ref in exp.batch_refs(timeout_s):  # shards in order; rows index their concatenation
        if offset > need:
            break
        batch = get(ref, "completions (log_completions)", timeout_s)
        for i in range(len(batch)):
            texts[offset + i] = (batch.prompts[i], batch.completions[i])
        offset += len(batch)
    out = []
    for j, i in enumerate(where):
        prompt, completion = texts[i]
        row: dict[str, Any] = {
            "prompt": prompt,
            "completion": completion,
            "reward": float(s.scores[j]),
        }
        row.update({f"reward/{k}": float(v[j]) for k, v in s.breakdown.items()})
        row["response_len"] = int(s.response_len[j])
        out.append(row)
    return out
