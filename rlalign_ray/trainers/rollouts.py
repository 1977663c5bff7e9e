"""Experience in flight: each training step's chunks, scored and referenced as they land.

``Rollouts`` sits between the driver's loop and the pools. ``request(step)`` draws the
step's prompts and queues their chunks on the generator pool; ``pump`` sends every chunk
that lands to the reward pool and the reference at once (token batches never pass the
driver); ``collect(step)`` waits for the step's chunks and returns its ``Experience``.
With pipelining several steps are in flight; every chunk records the weight version that
sampled it, and ``collect`` drops (and regenerates) chunks more than the staleness bound
(``trainer.max_staleness``, or auto's current one: ``staleness``) behind the learner.

Pipelined runs are deterministic: a chunk samples with the latest version published when
it is requested (``pools/generator.py``), and its seed decides its samples; requests,
refills and regenerations happen at fixed points of the driver's loop. A checkpoint holds
the steps requested but not trained yet (``buffer``, ``buffer.py``), so a resumed run
trains on the same samples as the one that never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlalign_ray.algorithms import StalenessController
from rlalign_ray.config import Config
from rlalign_ray.data.batch import NONFINITE, PromptItem, ScoredShard
from rlalign_ray.data.prompts import PromptSampler
from rlalign_ray.errors import ActorFailure, DataError, RewardError
from rlalign_ray.pools import (
    Chunk,
    Experience,
    Future,
    GeneratorPool,
    GeneratorPools,
    ReferencePool,
    RewardPool,
)
from rlalign_ray.pools.chunks import joined_scores, open_scores, score_lost, score_refs
from rlalign_ray.rollout.inflight import version_summary
from rlalign_ray.runtime.placement import get
from rlalign_ray.trainers.buffer import BufferedChunk, BufferedStep, RolloutBuffer
from rlalign_ray.trainers.judges import Judges
from rlalign_ray.trainers.step_rows import group_finite, group_spread, inflight_metrics, sample_rows


@dataclass
class StepRollout:
    """One training step's generation: its chunks in request order, and their refs."""

    step: int
    chunks: list[Chunk] = field(default_factory=list)
    scored: dict[int, Any] = field(default_factory=dict)  # chunk id -> ScoredShard ref
    ref_lp: dict[int, Any] = field(default_factory=dict)  # chunk id -> reference log-probs
    ref_epoch: dict[int, int] = field(default_factory=dict)  # chunk id -> reference restarts
    judged: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> named pool -> ref
    rounds: int = 0  # generation rounds (dynamic sampling refills)
    dropped_stale: int = 0  # samples dropped (and regenerated) as too stale


class Rollouts:
    def __init__(
        self,
        cfg: Config,
        generators: GeneratorPool | GeneratorPools,
        rewards: RewardPool | Sequence[RewardPool],
        reference: ReferencePool | None,
        sampler: PromptSampler,
    ):
        """``rewards``: one pool, or several: the default one first, then named pools
        (``judges.py``) whose weighted totals are added to its."""
        rewards = [rewards] if isinstance(rewards, RewardPool) else list(rewards)
        self.cfg, self.staleness = cfg, staleness_controller(cfg)
        self.gen, self.reference = generators, reference
        self.rewards, self.judges = rewards[0], Judges(rewards[1:])
        self.sampler = sampler
        self.steps: dict[int, StepRollout] = {}
        self.requested = 0  # the last step whose generation was requested
        self.totals = {"generated": 0, "trained": 0, "dropped_stale": 0}
        self.sampler_before: dict[int, dict[str, int]] = {}  # step -> sampler state before it
        generators.score_with(self.rewards)  # the pool has each chunk scored as it lands
        self.samples: dict[int, list[dict[str, int]]] = {}  # trainer.sample_log: step -> rows

    def resume_state(self, step: int) -> dict[str, int]:
        """The sampler state that draws step ``step + 1`` (a checkpoint after ``step``):
        with pipelining, later steps' prompts may already be drawn."""
        return dict(self.sampler_before.get(step + 1, self.sampler.state_dict()))

    @property
    def k(self) -> int:
        """The staleness bound now (``trainer.max_staleness``; auto: it moves)."""
        return self.staleness.bound

    def resume_from(
        self,
        step: int,
        sampler: dict[str, int],
        totals: dict[str, int],
        buffer: RolloutBuffer | None = None,
    ) -> None:
        """Continue after ``step``: the steps in ``buffer`` as they were (their chunks
        landed), the next request after them. Without a buffer (an older checkpoint) the
        next request is step + 1, drawn from ``sampler``. What is in flight is dropped."""
        self.steps.clear(), self.sampler_before.clear(), self.samples.clear()
        self.totals.update(totals)
        self.sampler.load_state_dict(buffer.sampler if buffer else sampler)
        self.requested = buffer.requested if buffer else step
        for b in buffer.steps if buffer else []:
            self.steps[b.step] = self._restored(b)
            if b.sampler_before is not None:
                self.sampler_before[b.step] = b.sampler_before

    # ---- the rollout buffer of a checkpoint (buffer.py) -----------------------------------
    def buffer(self) -> RolloutBuffer:
        """Every step requested but not trained yet, its chunks landed, scored and
        referenced: a pipelined checkpoint's buffer. Waits for the chunks in flight (and
        their scores); the token batches pass through the driver once, at checkpoints."""
        later = [self.steps[k] for k in sorted(self.steps)]
        self._until_landed([c for s in later for c in s.chunks])
        steps = [self._buffered(s) for s in later]
        return RolloutBuffer(self.requested, self.sampler.state_dict(), steps)

    def _buffered(self, s: StepRollout) -> BufferedStep:
        timeout, what = self.cfg.run.call_timeout_s, "checkpoint: buffered chunks"
        batches = get([c.ref for c in s.chunks], what, timeout)
        shards = self._scores(s.chunks, s.scored, what)
        shards = self.judges.combined(s.chunks, shards, s.judged, self._scores, what)
        refs = [None] * len(s.chunks)
        if self.reference is not None:
            if self.reference.max_restarts:
                self._check_reference(s)
            refs = get([s.ref_lp[c.id] for c in s.chunks], what, timeout)
        out = BufferedStep(s.step, s.rounds, s.dropped_stale, self.sampler_before.get(s.step))
        for c, batch, scores, ref in zip(s.chunks, batches, shards, refs):
            out.chunks.append(
                BufferedChunk(
                    [it.index for it in c.items], c.n, c.seed, c.version, c.actor, c.pinned,
                    batch, scores, ref, c.extra.get("info", {}).get("inflight_loads", 0),
                )
            )  # fmt: skip
        return out

    def _restored(self, b: BufferedStep) -> StepRollout:
        """A buffered step as it was at the checkpoint: its chunks landed (their batches,
        scores and reference log-probs put into the object store)."""
        import ray

        items = {it.index: it for it in self.sampler.items}
        s = StepRollout(b.step, rounds=b.rounds, dropped_stale=b.dropped_stale)
        now = time.perf_counter()
        for bc in b.chunks:
            if any(i not in items for i in bc.prompts):
                raise DataError(
                    f"the checkpoint's rollout buffer holds samples of data.train prompts "
                    f"{sorted(set(bc.prompts) - set(items))}, which the dataset now lacks; "
                    "resume with the data.train the run was started with"
                )
            prompts = [items[i] for i in bc.prompts]
            (c,) = self.gen.chunks(prompts, bc.n, step=b.step, chunk_size=len(prompts))
            c.seed, c.version, c.actor, c.pinned = bc.seed, bc.version, bc.actor, bc.pinned
            c.ref, c.done, c.submitted_s, c.finished_s = ray.put(bc.batch), True, now, now
            if bc.batch.token_versions is not None:  # what inflight_metrics reads
                summary = version_summary(bc.batch.token_versions, bc.batch.response_mask)
                c.extra["info"] = {"inflight_loads": bc.inflight_loads, "token_versions": summary}
            s.chunks.append(c)
            s.scored[c.id] = ray.put(bc.scores)
            if self.reference is not None:  # (a buffer saved without one: computed now)
                ref = bc.ref_logprobs
                s.ref_lp[c.id] = ray.put(ref) if ref is not None else self.reference.logprobs(c.ref)
                s.ref_epoch[c.id] = self.reference.restarts
        return s

    # ---- requesting and landing ---------------------------------------------------------
    def request_upto(self, step: int) -> None:
        """Queue generation for every step up to ``step`` not requested yet."""
        while self.requested < step:
            self.requested += 1
            self.steps[self.requested] = StepRollout(self.requested)
            self.sampler_before[self.requested] = self.sampler.state_dict()
            self._request(self.steps[self.requested], self.sampler.next(self._want))

    @property
    def _want(self) -> int:
        return self.cfg.rollout.prompts_per_step

    def _request(self, s: StepRollout, prompts: Sequence[PromptItem]) -> None:
        r = self.cfg.rollout
        seed = (self.cfg.run.seed * 1_000_003 + s.step) * 101 + s.rounds
        chunks = self.gen.chunks(
            prompts, r.n_samples, step=s.step, chunk_size=r.chunk_size, seed=seed
        )
        s.rounds += 1
        s.chunks += chunks
        self.gen.submit(chunks)

    def pump(self, timeout_s: float = 0.0, also: Sequence[Any] = ()) -> None:
        """Hand every chunk that landed to the reward pool and the reference (waiting up to
        ``timeout_s`` for one, or for a ref in ``also``)."""
        for chunk in self.gen.poll(timeout_s, also):
            s = self.steps.get(chunk.step)
            if s is None or chunk.greedy:
                continue  # evaluation (or a caller's own chunk): scored by its owner
            self.totals["generated"] += chunk.rows
            scored = chunk.scored  # a handle on its scores (None: a pool that left them to us)
            s.scored[chunk.id] = self.rewards.score(chunk.ref) if scored is None else scored
            if self.judges:
                s.judged[chunk.id] = self.judges.score(chunk.ref)
            if self.reference is not None:
                s.ref_lp[chunk.id] = self.reference.logprobs(chunk.ref)
                s.ref_epoch[chunk.id] = self.reference.restarts

    def wait(self, fut: Future) -> Any:
        """``fut.result()``, landing chunks meanwhile (generation goes on while we wait)."""
        deadline = time.monotonic() + self.cfg.run.call_timeout_s
        while not fut.ready():
            if time.monotonic() > deadline:
                raise ActorFailure(
                    f"{fut.what} did not finish within {self.cfg.run.call_timeout_s:g}s "
                    "(run.call_timeout_s)"
                )
            self.pump(1.0, also=fut.refs)
        return fut.result()

    def _until_landed(self, chunks: list[Chunk]) -> None:
        deadline = time.monotonic() + self.cfg.run.call_timeout_s
        while not all(c.done for c in chunks):
            if time.monotonic() > deadline:
                raise ActorFailure(
                    f"generation did not finish within {self.cfg.run.call_timeout_s:g}s "
                    "(run.call_timeout_s)"
                )
            self.pump(1.0)

    # ---- a step's experience --------------------------------------------------------------
    def collect(self, step: int, learner_version: int) -> Experience:
        """Wait for ``step``'s chunks; drop and regenerate those sampled more than the
        staleness bound ``k`` versions before ``learner_version``; with dynamic sampling,
        refill groups whose rewards are all equal (at most ``max_refills`` extra rounds)."""
        a, n = self.cfg.algorithm, self.cfg.rollout.n_samples
        s = self.steps[step]
        t0 = time.perf_counter()
        while True:
            self._until_landed(s.chunks)
            if self._drop_stale(s, learner_version):
                continue  # never trained: regenerated with the current weights
            t_gen = time.perf_counter() - t0
            if self.judges:  # each chunk's scores with its named pools' added
                shards = self._scores(s.chunks, s.scored, "reward pool")
                shards = self.judges.combined(s.chunks, shards, s.judged, self._scores, "pool")
                scores = ScoredShard.concat(shards)
            else:
                scores = self._scores(s.chunks, s.scored, "reward pool", joined=True)
            finite = group_finite(scores.scores, n)  # all True unless on_nonfinite: drop_group
            informative = (group_spread(scores.scores, n) > 0) & finite
            if self._enough(finite, informative, s.rounds):
                break
            missing = self._want - int(finite.sum())
            self._request(s, self.sampler.next(self._want if a.dynamic_sampling else missing))
        rows, scores, stats = self._select(scores, finite, informative, s.rounds)
        stats.update(self._timing(s, t0, t_gen))
        stats.update(self._staleness(s, learner_version, rows))
        return self._experience(step, s, rows, scores, stats)

    def _drop_stale(self, s: StepRollout, learner_version: int) -> bool:
        """Drop (and request again) the step's chunks more than the staleness bound ``k``
        behind ``learner_version``; whether there were any. With in-flight updates a
        chunk's version is its oldest token's (every row starts with the chunk's first
        version), so a row counts its oldest token."""
        stale = [c for c in s.chunks if learner_version - c.version > self.k]
        if not stale:
            return False
        s.dropped_stale += sum(c.rows for c in stale)
        self.totals["dropped_stale"] += sum(c.rows for c in stale)
        s.chunks = [c for c in s.chunks if c not in stale]
        for c in stale:
            s.scored.pop(c.id, None), s.ref_lp.pop(c.id, None), s.judged.pop(c.id, None)
        s.rounds -= 1
        self._request(s, [it for c in stale for it in c.items])
        return True

    def _select(self, scores: ScoredShard, finite, informative, rounds: int):
        """The step's rows (None: all) and scores: groups with a non-finite reward left out,
        and with dynamic sampling informative groups first; their statistics."""
        a, n = self.cfg.algorithm, self.cfg.rollout.n_samples
        rows, stats = None, {}
        flags = scores.breakdown.pop(NONFINITE, None)
        if flags is not None:
            stats["reward/nonfinite"] = float(flags.sum())
            stats["reward/dropped_groups"] = float((~finite).sum())
        if a.dynamic_sampling:
            stats["train/informative_groups"] = float(informative.float().mean())
            stats["train/refills"] = float(rounds - 1)
        if a.dynamic_sampling or not finite.all():
            # dynamic sampling: informative groups first, then (if refills ran out)
            # uninformative ones; groups with a non-finite reward never
            rank = 2 * (~finite).int() + (~informative).int() * a.dynamic_sampling
            order = torch.argsort(rank, stable=True)[: self._want]
            rows = (order.sort().values[:, None] * n + torch.arange(n)).flatten()
            scores = scores.select(rows)
        return rows, scores, stats

    def _experience(self, step: int, s: StepRollout, rows, scores, stats) -> Experience:
        """The step's Experience (its bookkeeping here released)."""
        self.totals["trained"] += len(scores)
        if self.reference is not None and self.reference.max_restarts:
            self._check_reference(s)
        refs = [s.ref_lp[c.id] for c in s.chunks] if self.reference is not None else None
        if self.cfg.trainer.sample_log:
            self.samples[step] = sample_rows(s.chunks, rows)
        del self.steps[step]
        self.sampler_before.pop(step, None)
        return self.gen.experience(s.chunks, rows, scores, refs, stats)

    def _enough(self, finite: torch.Tensor, informative: torch.Tensor, rounds: int) -> bool:
        """Whether the step has its groups: ``prompts_per_step`` with finite rewards (and,
        with dynamic sampling, informative ones until the refills run out). Fails when
        non-finite rewards (``reward.on_nonfinite: drop_group``) left too few groups after
        ``algorithm.max_refills`` extra rounds."""
        a = self.cfg.algorithm
        have = int(finite.sum())
        if a.dynamic_sampling and int(informative.sum()) >= self._want:
            return True
        if rounds <= a.max_refills:
            return have >= self._want and not a.dynamic_sampling
        if have < self._want:
            raise RewardError(
                f"only {have} of {self._want} prompt groups had finite rewards after "
                f"{rounds} generation rounds (reward.on_nonfinite: drop_group, "
                "algorithm.max_refills); fix the rewards that return NaN or inf"
            )
        return True

    def _timing(self, s: StepRollout, t0: float, t_gen: float) -> dict[str, float]:
        first = min(c.submitted_s for c in s.chunks)
        last = max(c.finished_s for c in s.chunks)
        return {
            "time/generate_s": last - first,
            "time/reward_s": time.perf_counter() - t0 - t_gen,  # waited on after generation
            "time/learner_idle_s": time.perf_counter() - t0,  # the driver had nothing to train
        }

    def _staleness(self, s: StepRollout, learner_version: int, rows) -> dict[str, float]:
        ages = torch.tensor(
            [float(learner_version - c.version) for c in s.chunks for _ in range(c.rows)]
        )
        ages = ages[rows] if rows is not None else ages
        out = {
            "rollout/staleness_mean": float(ages.mean()),
            "rollout/staleness_max": float(ages.max()),
            "rollout/dropped_stale": float(s.dropped_stale),
            "rollout/versions": float(len({c.version for c in s.chunks})),
        }
        if self.cfg.rollout.inflight_updates:  # per token: chunks span versions
            out.update(inflight_metrics(s.chunks, learner_version, rows))
        return out

    # ---- dead reward and reference actors ---------------------------------------------------
    def _scores(
        self,
        chunks: list[Chunk],
        scored: dict[int, Any],
        what: str,
        pool: RewardPool | None = None,
        joined: bool = False,
    ) -> Any:
        """Each chunk's ScoredShard (from ``pool``, default: the default reward pool), or
        with ``joined`` them all joined in order. ``scored`` holds handles on them
        (``pools.open_scores``). A chunk whose reward actor died is scored again once the
        pool has replaced it (``run.max_actor_restarts``)."""
        import ray

        pool, timeout = pool or self.rewards, self.cfg.run.call_timeout_s
        fetch = joined_scores if joined else open_scores
        for attempt in range(pool.max_restarts + 2):
            handles = [scored[c.id] for c in chunks]
            try:
                return fetch(handles, what, timeout)
            except ActorFailure:
                if not pool.max_restarts or attempt > pool.max_restarts:
                    raise
                refs = score_refs(handles)
                ray.wait(refs, num_returns=len(refs), timeout=timeout)
                dead = [c for c in chunks if score_lost(scored[c.id])]
                if not dead:
                    raise
                pool.heal()  # an actor that died is replaced (or the run stops)
                if pool is self.rewards:  # the generator pools score with its new actors
                    self.gen.score_with(pool)
                for c in dead:
                    scored[c.id] = pool.score(c.ref)
        raise AssertionError("unreachable")

    def _check_reference(self, s: StepRollout) -> None:
        """Reference log-probs requested before a reference actor died (and was replaced)
        are requested again. A ping queues behind an actor's calls and fails at once when
        the actor is dead, so a live busy actor costs at most a short wait."""
        import ray

        refs = [s.ref_lp[c.id] for c in s.chunks]
        ray.wait(refs, num_returns=len(refs), timeout=self.cfg.run.call_timeout_s)
        self.reference.heal(timeout_s=0.1)
        now = self.reference.restarts
        for c in s.chunks:
            if s.ref_epoch.get(c.id, now) < now:
                s.ref_lp[c.id], s.ref_epoch[c.id] = self.reference.logprobs(c.ref), now

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate_sets(
        self, sets: dict[str, list[PromptItem]], n_samples: int = 1
    ) -> tuple[dict[str, ScoredShard], float]:
        """``n_samples`` samples per prompt of each eval set at ``rollout.eval_temperature``
        (0: greedy), all their chunks queued together ahead of training chunks, scored: each
        set's scores, and the seconds until the last chunk landed."""
        t0 = time.perf_counter()
        size = self.cfg.rollout.chunk_size
        owner: dict[int, str] = {}
        chunks = []
        for name, items in sets.items():
            for c in self.gen.chunks(items, n_samples, greedy=True, chunk_size=size):
                owner[c.id] = name
                chunks.append(c)
        self.gen.submit(chunks, front=True)
        scored: dict[int, Any] = {}
        judged: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.cfg.run.call_timeout_s
        while True:
            for c in chunks:  # score each chunk as it lands
                if c.done and c.id not in scored:
                    scored[c.id] = self.rewards.score(c.ref)
                    if self.judges:
                        judged[c.id] = self.judges.score(c.ref)
            if len(scored) == len(chunks):
                break
            if time.monotonic() > deadline:
                raise ActorFailure(
                    f"evaluation did not finish within {self.cfg.run.call_timeout_s:g}s "
                    "(run.call_timeout_s)"
                )
            self.pump(1.0)
        t_gen = time.perf_counter() - t0
        shards = self._scores(chunks, scored, "reward pool (eval)")
        shards = self.judges.combined(chunks, shards, judged, self._scores, "eval")
        out = {}
        for name in sets:
            scores = ScoredShard.concat([x for c, x in zip(chunks, shards) if owner[c.id] == name])
            flags = scores.breakdown.pop(NONFINITE, None)
            if flags is not None and flags.any():  # drop_group: evaluate the finite samples
                scores = scores.select(torch.isfinite(scores.scores).nonzero().squeeze(1))
            out[name] = scores
        return out, t_gen


def staleness_controller(cfg: Config) -> StalenessController:
    """``trainer.max_staleness`` as a controller: fixed, or auto with its cap and thresholds."""
    t = cfg.trainer
    if t.max_staleness != "auto":
        return StalenessController.fixed(int(t.max_staleness))
    return StalenessController(
        t.max_staleness_cap, t.staleness_kl_high, t.staleness_clip_high, t.staleness_patience
    )
