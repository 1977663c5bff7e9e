"""The rollout buffer of a pipelined checkpoint: chunks sampled for steps not trained yet.

At a checkpoint after step s, a pipelined run (``trainer.max_staleness`` >= 1 or auto) has
requested generation for steps s + 1 .. s + k already. The driver waits until every one of
their chunks has landed and been scored and referenced (``Rollouts.buffer``; the run that
never stops takes the same wait at the same point, so both go on from the same state) and
writes them into the checkpoint:

    rollout_buffer/
      buffer.json     the last step requested, the prompt sampler's state after it was
                      drawn, and per step: its generation rounds, samples dropped as stale,
                      the sampler's state before it, and per chunk its prompts (dataset
                      indices), samples per prompt, seed, weight version, generator, the
                      versions it loaded mid-generation (in-flight updates), and the plain
                      fields of its RolloutBatch and ScoredShard (texts, columns)
      step_<s>.pt     step s's tensors, per chunk: the RolloutBatch's (tokens, masks,
                      behaviour log-probs), the ScoredShard's (rewards) and the reference
                      log-probs; tensors only, read with ``torch.load(weights_only=True)``

A resumed run (``trainer.resume``, or the learner group restarted inside the run) puts them
back as landed chunks: steps s + 1 .. s + k train on exactly the samples the uninterrupted
run trains on, and nothing is sampled twice or skipped. A checkpoint without the folder
(written before it existed) resumes as those did: later steps are drawn and sampled again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlalign_ray import checkpoint
from rlalign_ray.data.batch import RolloutBatch, ScoredShard
from rlalign_ray.errors import DataError

FOLDER = "rollout_buffer"
INDEX = "buffer.json"
FORMAT = 1


@dataclass
class BufferedChunk:
    """One landed chunk: what it sampled, how, and what it was scored."""

    prompts: list[int]  # the dataset indices of its prompts
    n: int  # samples per prompt
    seed: int | None
    version: int  # the weight version that sampled it
    actor: int | None  # the generator that ran it (the sample ledger names it)
    pinned: int | None
    batch: RolloutBatch
    scores: ScoredShard
    ref_logprobs: torch.Tensor | None = None  # (B, T); None without a reference
    inflight_loads: int = 0  # versions loaded while it was sampled (rollout.inflight_updates)


@dataclass
class BufferedStep:
    step: int
    rounds: int  # generation rounds requested so far (seeds of refills count on)
    dropped_stale: int
    sampler_before: dict[str, int] | None  # the sampler's state before the step was drawn
    chunks: list[BufferedChunk] = field(default_factory=list)


@dataclass
class RolloutBuffer:
    requested: int  # the last step whose generation was requested
    sampler: dict[str, int]  # the prompt sampler's state after it
    steps: list[BufferedStep] = field(default_factory=list)

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        index = {"format": FORMAT, "requested": self.requested, "sampler": self.sampler}
        index["steps"] = []
        for s in self.steps:
            tensors, chunks = [], []
            for c in s.chunks:
                batch_t, batch_p = _split(c.batch)
                scores_t, scores_p = _split(c.scores)
                tensors.append({"batch": batch_t, "scores": scores_t, "ref": c.ref_logprobs})
                meta = {k: getattr(c, k) for k in ("prompts", "n", "seed", "version", "actor")}
                meta["inflight_loads"] = c.inflight_loads
                chunks.append({**meta, "pinned": c.pinned, "batch": batch_p, "scores": scores_p})
            torch.save(tensors, folder / f"step_{s.step}.pt")
            index["steps"].append(
                {
                    "step": s.step,
                    "rounds": s.rounds,
                    "dropped_stale": s.dropped_stale,
                    "sampler_before": s.sampler_before,
                    "chunks": chunks,
                }
            )
        try:
            text = json.dumps(index, indent=1)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"a pipelined checkpoint stores the buffered samples' texts and dataset columns "
                f"as JSON, and one is not JSON ({e}); keep dataset columns to JSON values"
            ) from None
        (folder / INDEX).write_text(text + "\n")

    @classmethod
    def read(cls, folder: Path) -> RolloutBuffer | None:
        """The buffer in ``folder`` (None: a checkpoint written without one)."""
        if not (folder / INDEX).is_file():
            return None
        index = json.loads((folder / INDEX).read_text())
        steps = []
        for s in index["steps"]:
            tensors = checkpoint.load(folder / f"step_{s['step']}.pt")
            chunks = [
                BufferedChunk(
                    **{k: c[k] for k in ("prompts", "n", "seed", "version", "actor", "pinned")},
                    batch=RolloutBatch(**t["batch"], **c["batch"]),
                    scores=ScoredShard(**t["scores"], **c["scores"]),
                    ref_logprobs=t["ref"],
                    inflight_loads=c.get("inflight_loads", 0),
                )
                for c, t in zip(s["chunks"], tensors)
            ]
            fields = ("step", "rounds", "dropped_stale", "sampler_before")
            steps.append(BufferedStep(**{k: s[k] for k in fields}, chunks=chunks))
        return cls(index["requested"], index["sampler"], steps)


def _split(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A batch dataclass's fields: tensors (and non-empty dicts of tensors), and the rest."""
    tensors, plain = {}, {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            tensors[f.name] = v.contiguous()
        elif isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
            tensors[f.name] = {k: x.contiguous() for k, x in v.items()}
        else:
            plain[f.name] = v
    return tensors, plain
