"""The generator pool: prompts in, streams of sampled chunks out, pulled by idle actors.

    chunks = gen.chunks(prompts, n=8, step=3, chunk_size=4)   # small units of work
    gen.submit(chunks)                                          # queued; idle actors pull
    for chunk in gen.as_completed(chunks):                      # as each one lands
        scores.append(rewards.score(chunk.ref))

A chunk is a few prompts sampled by one actor call. With ``chunk_size=0`` the prompts are
cut into one chunk per actor, each pinned to its actor (a static split). Otherwise each
actor runs at most ``max_inflight`` chunks at a time and an actor that finishes pulls the
next queued chunk, so a slow chunk holds up only its own actor; pulled chunks carry a seed
of their own, so their samples do not depend on which actor ran them.

The pool knows, for every actor, the weight version it will hold when the next call
queued to it runs (``WeightSync`` queues the loads), so every chunk records the version
that sampled it; the actor reports it too and the two must agree.

The determinism rule: a chunk samples with the latest version published when it was
submitted, whichever actor runs it and whenever. ``WeightSync`` calls ``before_load``
before it queues a new version's loads, and the chunks still queued here go to actors
then, ahead of the load (``max_inflight`` gives way for them), so no chunk waits here across
a weight update. Which version samples a chunk thus follows from the order of the driver's
requests and publishes alone; with its seed (or, pinned, its actor's random stream, which
only it uses), its samples too. Not so for a chunk re-issued after its actor died: it
samples with whatever its new actor holds.

With ``rollout.inflight_updates`` a load reaches an actor mid-chunk (rollout/inflight.py):
a chunk records its oldest token's version, and where a load meets its decode steps follows
the machine's timing (such runs are not deterministic; a resume is lossless, not exact).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rlalign_ray.config import Config, Placement, Resources
from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.data.step_batches import PickedBatches, StepBatches
from rlalign_ray.errors import ActorFailure
from rlalign_ray.pools.base import ActorPool
from rlalign_ray.pools.chunks import (
    Chunk,
    dispatch_runs,
    joined_scores,
    make_chunks,
    split,
)
from rlalign_ray.pools.dispatch_groups import DispatchGroups
from rlalign_ray.pools.learner import Experience
from rlalign_ray.pools.weight_targets import PoolTargets
from rlalign_ray.rollout.inflight import CONCURRENCY_GROUPS
from rlalign_ray.runtime.dispatch import start_dispatchers
from rlalign_ray.runtime.placement import actor_died, get

log = logging.getLogger(__name__)


class GeneratorPool(DispatchGroups, PoolTargets, ActorPool):
    """Generator actors (``rollout/generator.py``'s ``Generator`` by default); what a
    ``WeightSync`` sends to (``PoolTargets``)."""

    role = "generator"

    def actor_args(self, i: int) -> tuple:
        # the environment only for multi-turn runs, so custom classes keep their signature
        c = self.cfg
        env = (c.env,) if c.env.path else ()
        return (c.model, c.rollout, c.run.seed, i, c.data.max_prompt_tokens, *env)

    def __init__(
        self,
        cfg: Config,
        num_actors: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
        max_inflight: int = 1,
    ):
        super().__init__(cfg, num_actors, resources, placement, cls, name)
        self.inflight_updates = cfg.rollout.inflight_updates
        if self.inflight_updates:  # weight loads run beside the chunk being sampled
            self.spec.concurrency_groups = dict(CONCURRENCY_GROUPS)
        self.max_inflight = max_inflight
        self.versions: list[int] = []  # per actor: the version its next queued call sees
        self.queue: deque[Chunk] = deque()
        self.inflight: dict[Any, Chunk] = {}  # info ref -> chunk
        self.load: list[int] = []  # chunks in flight per actor
        self.idle_s: list[float] = []  # per actor: seconds with nothing in flight
        self._idle_since: list[float | None] = []
        self._busy_since: dict[int, float] = {}  # actor -> when its current chunk started
        self._next_id = 0
        # rollout.dispatch_group > 0: dispatcher actors run the generators in groups
        self.group = cfg.rollout.dispatch_group
        self.dispatchers: list[Any] = []
        # run ref -> (group, its chunks, the ref of its batches' refs)
        self._runs: dict[Any, tuple[int, list[Chunk], Any]] = {}
        self._group_load: list[int] = []  # chunks sent to each dispatcher, not landed
        self._busy_total, self._started_s = 0.0, 0.0
        self.scorer: Any = None  # the reward pool each sampled chunk goes to (score_with)

    def started(self) -> None:
        super().started()
        n = len(self.actors)
        self.versions, self.load = [0] * n, [0] * n
        self.idle_s, self._idle_since = [0.0] * n, [time.perf_counter()] * n
        if self.group > 0:
            self.dispatchers = start_dispatchers(
                self.actors, self.group, self.name, self.cfg.rollout.timeout_s
            )
            self._group_load = [0] * len(self.dispatchers)
            self._started_s = time.perf_counter()

    @property
    def helpers(self) -> list[Any]:
        """Actors the pool started besides its generators (dispatchers); stopped with it."""
        return self.dispatchers

    def score_with(self, rewards: Any) -> None:
        """Have every sampled (non-greedy) chunk scored by ``rewards`` (a ``RewardPool``) as
        it lands: ``chunk.scored`` then holds a handle on its ScoredShard (read with
        ``chunks.open_scores``). With dispatchers they hand each batch to a reward actor
        (actor to actor) and have the run's scores joined there: the call reaches each
        dispatcher before every run sent after it (a dispatcher runs its calls in order), so
        it is not waited for (called again after a reward actor was replaced, waiting would
        hold the driver until the runs in flight finish)."""
        self.scorer = rewards
        for d in self.dispatchers:
            d.score_with.remote(list(rewards.actors))

    # ---- work -------------------------------------------------------------------------
    def chunks(
        self,
        items: Sequence[PromptItem],
        n: int,
        greedy: bool = False,
        step: int = 0,
        chunk_size: int = 0,
        seed: int | None = None,
    ) -> list[Chunk]:
        """Cut ``items`` into chunks: ``chunk_size`` prompts each (pulled by idle actors,
        seeded from ``seed``), or with 0 one contiguous chunk per actor, pinned to it."""
        out = make_chunks(items, n, len(self.actors), self._next_id, greedy, step, chunk_size, seed)
        self._next_id += len(out)
        return out

    def submit(self, chunks: Sequence[Chunk], front: bool = False) -> list[Chunk]:
        """Queue chunks (``front``: before those already waiting) and start what idle actors
        can take."""
        if self.dispatchers:
            self._dispatch_groups(list(chunks))
            return list(chunks)
        if front:
            self.queue.extendleft(reversed(list(chunks)))
        else:
            self.queue.extend(chunks)
        self._dispatch()
        return list(chunks)

    def before_load(self, version: int) -> None:
        """``WeightSync`` is about to queue ``version``'s loads: start every queued chunk now
        (pinned ones on their actor, others on the least loaded), so each samples with the
        version it was submitted under (the determinism rule above). With dispatchers every
        chunk reached one at submit already."""
        while self.queue and not self.dispatchers:
            chunk = self.queue.popleft()
            actor = chunk.pinned
            if actor is None:
                actor = min(range(len(self.actors)), key=lambda i: self.load[i])
            self._start(chunk, actor)

    def _dispatch(self) -> None:
        waiting = deque()
        while self.queue:
            chunk = self.queue.popleft()
            actor = self._free_actor(chunk.pinned)
            if actor is None:
                waiting.append(chunk)
                if chunk.pinned is None:  # nobody is free: later chunks wait too
                    break
                continue
            self._start(chunk, actor)
        waiting.extend(self.queue)
        self.queue = waiting

    def _free_actor(self, pinned: int | None) -> int | None:
        if pinned is not None:
            return pinned if self.load[pinned] < self.max_inflight else None
        best = min(range(len(self.actors)), key=lambda i: self.load[i])
        return best if self.load[best] < self.max_inflight else None

    def _start(self, chunk: Chunk, actor: int) -> None:
        strict = None if chunk.greedy else self.versions[actor]
        chunk.actor, chunk.version = actor, self.versions[actor]
        chunk.ref, chunk.info_ref = (
            self.actors[actor]
            .generate_chunk.options(num_returns=2)
            .remote(chunk.items, chunk.n, chunk.greedy, strict, chunk.seed)
        )
        chunk.submitted_s = time.perf_counter()
        self.inflight[chunk.info_ref] = chunk
        if self.load[actor] == 0:
            self._busy_since[actor] = chunk.submitted_s
        if self.load[actor] == 0 and self._idle_since[actor] is not None:
            self.idle_s[actor] += chunk.submitted_s - self._idle_since[actor]
            self._idle_since[actor] = None
        self.load[actor] += 1

    def pending(self) -> list[Any]:
        """The refs ``poll`` waits on: chunks in flight (with dispatchers, their runs)."""
        return list(self._runs) if self.dispatchers else list(self.inflight)

    def backlog(self) -> float:
        """Chunks queued or in flight per actor."""
        held = sum(self._group_load) if self.dispatchers else len(self.queue) + sum(self.load)
        return held / max(1, len(self.actors))

    def poll(self, timeout_s: float = 0.0, also: Sequence[Any] = ()) -> list[Chunk]:
        """Chunks that finished, waiting up to ``timeout_s`` for the first (or for one of
        the refs in ``also`` to be ready); their actors pull queued chunks at once."""
        import ray

        if self.dispatchers:  # they check rollout.timeout_s themselves
            return self._poll_groups(timeout_s, also)
        self.check_overdue()
        pending = list(self.inflight) + list(also)
        if not pending:
            return []
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if ready:  # take every other one already finished too
            ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        finished = [self.inflight.pop(r) for r in ready if r in self.inflight]
        if not finished:
            return []
        try:
            infos = get([c.info_ref for c in finished], f"{self.name} pool", self.timeout_s)
        except ActorFailure:  # a generator died: replace it, sample its chunks again
            rest = self._recover(finished)
            if rest is None:
                raise
            finished = rest
            infos = get([c.info_ref for c in finished], f"{self.name} pool", self.timeout_s)
        now = time.perf_counter()
        for chunk, info in zip(finished, infos):
            self._check_version(chunk, info)
            chunk.done, chunk.finished_s = True, now
            chunk.extra["info"] = info
            if self.scorer is not None and not chunk.greedy and chunk.step >= 0:
                chunk.scored = self.scorer.score(chunk.ref)
            self.load[chunk.actor] -= 1
            self._busy_since[chunk.actor] = now  # its next chunk (if any) starts now
            if self.load[chunk.actor] == 0:
                self._idle_since[chunk.actor] = now
                self._busy_since.pop(chunk.actor)
        self._dispatch()
        return finished

    def _check_version(self, chunk: Chunk, info: dict[str, Any]) -> None:
        """The actor sampled ``chunk`` with the version the pool expected (in-flight updates:
        or a newer one, applied first in its other thread, which the chunk records)."""
        if chunk.greedy or info["version"] == chunk.version:
            return
        if self.inflight_updates and info["version"] > chunk.version:
            chunk.version = info["version"]
            return
        raise ActorFailure(
            f"{self.name} {chunk.actor} sampled chunk {chunk.id} with weight version "
            f"{info['version']}, the pool expected {chunk.version}"
        )

    # ---- dead generators --------------------------------------------------------------
    def _recover(self, finished: list[Chunk]) -> list[Chunk] | None:
        """Replace the generators whose chunks in ``finished`` failed because they died
        (``run.max_actor_restarts``) and queue those chunks again, first: the same prompts,
        sample indices and seed, sampled with the current weights. Returns the others (None:
        no chunk failed by a death, or restarts are off)."""
        dead = [c for c in finished if actor_died(c.info_ref)]
        if not dead or not self.max_restarts:
            return None
        for actor in sorted({c.actor for c in dead}):
            self.replace(actor, [c for c in dead if c.actor == actor])
        return [c for c in finished if c not in dead]

    def replace(self, index: int, chunks: Sequence[Chunk] = ()) -> Any:
        """``ActorPool.replace``; the dead actor's chunks (those in flight, and ``chunks``
        taken from it already) are queued again, ahead of the others."""
        lost = [c for c in self.inflight.values() if c.actor == index]
        for c in lost:
            self.inflight.pop(c.info_ref)
        lost = sorted({c.id: c for c in [*lost, *chunks]}.values(), key=lambda c: c.id)
        self.load[index] -= len(lost)  # chunks it finished before dying still count
        actor = super().replace(index)
        for c in lost:
            c.reset()
        self.queue.extendleft(reversed(lost))
        self._dispatch()
        return actor

    def replaced(self, index: int) -> None:
        """A new generator holds the initial weights (version 0) until the hooks (the
        ``WeightSync``) give it the current ones."""
        self.versions[index] = 0
        if self.dispatchers:  # runs sent from now on use the new actor
            local = index % self.group
            self.dispatchers[index // self.group].set_generator.remote(local, self.actors[index])
        if self.load[index] == 0:
            self._busy_since.pop(index, None)
            if self._idle_since[index] is None:
                self._idle_since[index] = time.perf_counter()

    def check_overdue(self) -> None:
        """Fail when a generator has run one chunk longer than ``rollout.timeout_s``,
        naming the generator and the chunk (a hung engine ends the run in that time)."""
        limit, now = self.cfg.rollout.timeout_s, time.perf_counter()
        for actor, since in self._busy_since.items():
            if now - since <= limit:
                continue
            mine = [c for c in self.inflight.values() if c.actor == actor]
            chunk = min(mine, key=lambda c: c.id) if mine else None
            what = (
                f"chunk {chunk.id} (step {chunk.step}, {len(chunk.items)} prompts x {chunk.n}"
                f" samples, first prompt {str(chunk.items[0].prompt)[:200]!r})"
                if chunk
                else "its chunk"
            )
            raise ActorFailure(
                f"{self.name} {actor} did not finish {what} within {limit:g}s "
                "(rollout.timeout_s); the generator may hang. Raise rollout.timeout_s for "
                "long generations, or check the generator's log"
            )

    def as_completed(self, chunks: Sequence[Chunk]) -> Iterator[Chunk]:
        """Yield ``chunks`` as they finish (submitting them first if they are not queued)."""
        if any(c.info_ref is None and c not in self.queue for c in chunks):
            self.submit([c for c in chunks if c.info_ref is None and c not in self.queue])
        wanted = {c.id for c in chunks if not c.done}
        for c in chunks:
            if c.done:
                yield c
        deadline = time.monotonic() + self.timeout_s
        while wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ActorFailure(
                    f"{self.name}: {len(wanted)} chunks did not finish within "
                    f"{self.timeout_s:g}s (run.call_timeout_s)"
                )
            for c in self.poll(min(left, 1.0)):
                if c.id in wanted:
                    wanted.discard(c.id)
                    yield c

    def generate(self, items: Sequence[PromptItem], n: int, greedy: bool = False) -> list[Any]:
        """Sample ``items`` now (one chunk per actor); returns the batches' refs in order."""
        chunks = self.submit(self.chunks(items, n, greedy))
        list(self.as_completed(chunks))
        return [c.ref for c in chunks]

    def idle_seconds(self) -> float:
        """Seconds actors spent with nothing to do so far, summed over actors."""
        now = time.perf_counter()
        if self.dispatchers:  # from the chunks' own times (in flight counts as idle)
            return len(self.actors) * (now - self._started_s) - self._busy_total
        return sum(
            s + (now - t if t is not None else 0.0) for s, t in zip(self.idle_s, self._idle_since)
        )

    # ---- what landed, as the learner takes it ----------------------------------------
    def scores(self, chunks: Sequence[Chunk], what: str = "reward pool") -> ScoredShard:
        """The landed ``chunks``' ScoredShards joined in order, from the handles the pool
        had them scored with (``score_with``; every chunk must have one)."""
        if any(c.scored is None for c in chunks):
            raise ValueError(f"{self.name}.scores: call score_with(reward_pool) first")
        return joined_scores([c.scored for c in chunks], what, self.timeout_s)

    def prescored(self, chunk: Chunk) -> Any:  # deprecated for a release
        _deprecated("GeneratorPool.prescored(chunk)", "chunk.scored")
        return chunk.scored

    def joined_scores(self, chunks: Sequence[Chunk], what: str) -> ScoredShard | None:
        _deprecated("GeneratorPool.joined_scores(chunks, what)", "scores(chunks, what)")
        return None if any(c.scored is None for c in chunks) else self.scores(chunks, what)

    def experience(
        self,
        chunks: Sequence[Chunk],
        rows: torch.Tensor | None,
        scores: ScoredShard,
        ref_logprobs: list[Any] | None,
        stats: dict[str, float],
    ) -> Experience:
        """The ``Experience`` of ``chunks``' batches (``rows`` of them, None: all). Chunks that
        dispatchers sampled travel as positions in their runs' lists of batch refs, which
        only learner rank 0 opens (``PickedBatches``): the driver holds O(runs) refs, not
        one per chunk."""
        if ref_logprobs is None and chunks and all(c.run is not None for c in chunks):
            runs, index = dispatch_runs(chunks)
            picks = [(index[id(c.run)], c.position) for c in chunks]
            batches: StepBatches = PickedBatches([r.batches for r in runs], picks)
        else:
            batches = StepBatches([c.ref for c in chunks])
        return Experience(batches, rows, scores, ref_logprobs, stats)

    def abandon(self) -> list[Chunk]:
        """Drop the queued chunks and mark those in flight as not wanted (step -1: whoever
        waits on them ignores them when they land); returns them."""
        dropped = [*self.queue, *self.inflight.values()]
        for c in dropped:
            c.step = -1
        self.queue.clear()
        return dropped

    def sleep(self, asleep: bool) -> None:
        """A backend that sleeps (``rollout.vllm.enable_sleep_mode``): free (or take back) the engines' GPU memory."""
        self.gather("sleep" if asleep else "wake_up")


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


__all__ = ["Chunk", "GeneratorPool", "split"]
