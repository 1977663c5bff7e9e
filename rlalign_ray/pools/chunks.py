"""What a generator pool hands out and gets back: chunks (a few prompts sampled by one
actor call) and, with dispatchers (``rollout.dispatch_group``), their runs; and the plain
functions over them (a static split, the runs of a step, their scores).

A chunk the pool had scored as it landed (``GeneratorPool.score_with``) carries a handle on
its ScoredShard in ``chunk.scored``: the ObjectRef of a reward actor's call, or its rows of
its dispatcher run's joined scores (``RunRows``). ``open_scores`` and ``joined_scores``
take either, so whoever reads scores never asks which."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.runtime.placement import get


@dataclass
class Chunk:
    """Prompts sampled together by one generator call."""

    id: int
    items: list[PromptItem]
    n: int  # samples per prompt
    greedy: bool = False
    step: int = 0  # the training step it is for (0: evaluation, or a user's own use)
    seed: int | None = None  # sampling seed (None: the actor's own random stream)
    pinned: int | None = None  # the actor it must run on (static split)
    actor: int | None = None  # the actor that ran it
    info_ref: Any = None  # ObjectRef of the small summary the actor returns with it
    version: int = -1  # weight version that sampled it
    submitted_s: float = 0.0
    finished_s: float = 0.0
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # a caller's own bookkeeping
    # a handle on its ScoredShard once the pool had it scored as it landed (score_with):
    # an ObjectRef, or RunRows
    scored: Any = None
    # sampled by a dispatcher (rollout.dispatch_group): its run, its place in the run's list
    # of batches
    run: DispatchRun | None = None
    position: int = -1
    _ref: Any = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.items) * self.n

    def reset(self) -> None:
        """Back to not sampled (its actor died): to be sent again with its seed."""
        self.ref = self.info_ref = self.actor = self.run = self.scored = None
        self.version, self.done = -1, False

    @property
    def ref(self) -> Any:
        """ObjectRef of its RolloutBatch (a dispatcher's chunk: fetched from its run's list
        on first use; the trainer's own path never needs it)."""
        if self._ref is None and self.run is not None:
            self._ref = self.run.batch_refs()[self.position]
        return self._ref

    @ref.setter
    def ref(self, value: Any) -> None:
        self._ref = value


@dataclass
class DispatchRun:
    """What one dispatcher run returned: the ref of its batches' refs (owned by the driver:
    the dispatcher's second return value) and the ref of its joined scores."""

    batches: Any
    scores: Any
    timeout_s: float
    _refs: list[Any] | None = None

    def batch_refs(self) -> list[Any]:
        if self._refs is None:
            self._refs = get(self.batches, "dispatcher run's batches", self.timeout_s)
        return self._refs


def split(items: list[Any], n: int) -> list[list[Any]]:
    """n contiguous, nearly equal parts (the first ones one longer)."""
    k, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def make_chunks(
    items: Sequence[PromptItem],
    n: int,
    actors: int,
    first_id: int,
    greedy: bool = False,
    step: int = 0,
    chunk_size: int = 0,
    seed: int | None = None,
) -> list[Chunk]:
    """Cut ``items`` into chunks numbered from ``first_id``: ``chunk_size`` prompts each
    (seeded from ``seed``), or with 0 one contiguous chunk per actor of ``actors``, pinned
    to it."""
    items = list(items)
    if chunk_size <= 0:
        parts = [(i, p) for i, p in enumerate(split(items, actors)) if p]
    else:
        parts = [(None, items[k : k + chunk_size]) for k in range(0, len(items), chunk_size)]
    out = []
    for j, (pinned, part) in enumerate(parts):
        chunk_seed = None if pinned is not None or seed is None else seed * 100_003 + j
        out.append(Chunk(first_id + j, part, n, greedy, step, chunk_seed, pinned))
    return out


@dataclass(frozen=True)
class RunRows:
    """A chunk's scores as ``rows`` rows from ``first`` of its dispatcher run's joined
    scores (the dispatcher had a reward actor join them)."""

    run: DispatchRun
    first: int
    rows: int


def dispatch_runs(chunks: Sequence[Any]) -> tuple[list[Any], dict[int, int]]:
    """The dispatcher runs of ``chunks`` (or of ``RunRows``), each once in order of first
    use, and id(run) -> its index in that list."""
    index: dict[int, int] = {}
    runs = []
    for c in chunks:
        if id(c.run) not in index:
            index[id(c.run)] = len(runs)
            runs.append(c.run)
    return runs, index


def score_lost(handle: Any) -> bool:
    """Whether a finished score handle failed because a reward actor died: its call's actor,
    or (``RunRows``) one that scored or joined its run's scores."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    ref = _ref_of(handle)
    try:
        ray.get(ref, timeout=0)
    except RayActorError:
        return True
    except RayTaskError as e:  # a run's join whose input's actor died
        return isinstance(handle, RunRows) and isinstance(getattr(e, "cause", None), RayActorError)
    except Exception:
        return False
    return False


def score_refs(handles: Sequence[Any]) -> list[Any]:
    """The ObjectRefs behind score handles (a run's joined scores once per run)."""
    return list({id(r): r for r in [_ref_of(h) for h in handles]}.values())


def _ref_of(handle: Any) -> Any:
    return handle.run.scores if isinstance(handle, RunRows) else handle


def open_scores(handles: Sequence[Any], what: str, timeout_s: float) -> list[ScoredShard]:
    """Each handle's ScoredShard, in order (``chunk.scored``: ObjectRefs and ``RunRows``):
    the refs fetched together with one object per dispatcher run."""
    refs = [h for h in handles if not isinstance(h, RunRows)]
    runs, index = dispatch_runs([h for h in handles if isinstance(h, RunRows)])
    got = get(refs + [r.scores for r in runs], what, timeout_s)
    own, joined = iter(got[: len(refs)]), got[len(refs) :]  # per run: (ScoredShard, widths)
    out = []
    for h in handles:
        if not isinstance(h, RunRows):
            out.append(next(own))
            continue
        shard, widths = joined[index[id(h.run)]]
        rows = torch.arange(h.first, h.first + h.rows)
        out.append(shard.select(rows).narrow(max(widths[h.first : h.first + h.rows])))
    return out


def joined_scores(handles: Sequence[Any], what: str, timeout_s: float) -> ScoredShard:
    """The handles' ScoredShards joined in order: ``ScoredShard.concat(open_scores(...))``.
    When every one is rows of dispatcher runs, one ``select`` over the runs' joined scores
    (the driver's cost per step does not grow with the number of chunks)."""
    if not handles or not all(isinstance(h, RunRows) for h in handles):
        return ScoredShard.concat(open_scores(handles, what, timeout_s))
    runs, index = dispatch_runs(handles)
    got = get([r.scores for r in runs], what, timeout_s)  # per run: (ScoredShard, widths)
    widths = torch.tensor([w for _, run_widths in got for w in run_widths])
    starts = torch.tensor([0] + [len(shard) for shard, _ in got]).cumsum(0).tolist()
    first = torch.tensor([starts[index[id(h.run)]] + h.first for h in handles])
    sizes = torch.tensor([h.rows for h in handles])
    offsets = torch.arange(int(sizes.sum())) - (sizes.cumsum(0) - sizes).repeat_interleave(sizes)
    rows = first.repeat_interleave(sizes) + offsets  # each handle's rows, in order
    width = int(widths[rows].max())
    return ScoredShard.concat([shard for shard, _ in got]).select(rows).narrow(width)
