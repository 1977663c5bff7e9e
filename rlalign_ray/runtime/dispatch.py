"""Dispatchers: actors that run a group of generators for the driver (``rollout.dispatch_group``).

With hundreds of generators the driver's own time goes to Ray calls (each submission costs
the driver ~0.4 ms of CPU; measured in ``bench scale``): one sampling call, one scoring call
and one weight load per generator per step. A ``Dispatcher`` takes a group of generators
off the driver: per step the driver makes one ``run`` call per group carrying all of the
group's chunks, and one ``load_weights`` call per group per weight bucket. Inside the group
the dispatcher keeps the pull balance (an idle generator takes the next chunk), hands each
sampled batch to a reward actor as it lands (actor to actor: the batch never passes the
driver), and has a reward actor join the run's scores. What the driver gets back per run is
O(1) in Ray objects: plain summaries per chunk, one ref to the joined scores, and (a second
return value, owned by the driver) the list of the run's batch refs, which only learner rank
0 opens (``data.step_batches.PickedBatches``). Handling a borrowed ref costs the driver as
much CPU as a call: per-chunk refs were what still grew with the number of generators. For the same reason a weight load
hands the group's generators the publish call's result, fetched once by the dispatcher,
not the driver's ref to it (``bench scale`` at 256 actors: the driver's CPU in a step's
weight sync fell from 23.6 to 5.1 ms without it).

A dispatcher is a synchronous actor: the calls the driver sends it run in order, so a
weight load queued after a ``run`` reaches the group's generators after that run's chunks
(as a load queued to a generator does).

Torch-free (a dispatcher process needs only Ray): about 65 MB per dispatcher.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rlalign_ray.errors import ActorFailure


class Dispatcher:
    """Runs ``generators`` (actor handles; ``first``: the pool index of the first one)."""

    def __init__(self, generators: list[Any], first: int, name: str, timeout_s: float):
        self.gens, self.first, self.name, self.timeout_s = list(generators), first, name, timeout_s
        self.scorers: list[Any] = []
        self._turn = -1

    def ping(self) -> int:
        return len(self.gens)

    def score_with(self, scorers: list[Any]) -> None:
        """Reward actors to hand each sampled (non-greedy) batch to, in turn ([]: none)."""
        self.scorers = list(scorers)
        # the one that joins this group's scores: the same each run (a simulated reward
        # actor imports torch for it), spread over the groups
        self._joiner = (self.first // max(1, len(self.gens))) % max(1, len(self.scorers))

    def load_weights(self, handle: Any) -> list[int]:
        """One bucket on every generator of the group; the versions they now hold. The
        publish call's result is fetched here, once for the group (``WeightHandle.resolve``)."""
        import ray

        handle = handle.resolve()
        return ray.get([g.load_weights.remote(handle) for g in self.gens])

    def set_generator(self, local: int, generator: Any) -> None:
        """The group's generator ``local`` was replaced (it died): runs after this one use
        the new actor."""
        self.gens[local] = generator

    def run(self, chunks: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
        """Sample ``chunks`` (dicts: id, items, n, greedy, strict, seed, pinned: a group
        index or None) on the group's generators, pulled by idle ones. Returns (a summary, the
        batches' refs by position). The summary: ``chunks``, per chunk in landing order its id,
        actor (pool index), info (the generator's summary) and position; ``scores``, the ref
        of ``(joined ScoredShard, each row's own width)`` of the sampled (non-greedy) chunks in that order
        (``join_scores``; None: no scorers or only greedy chunks); ``dead``, the pool indices
        of generators that died, and ``lost``, the ids of the chunks they took with them (or
        that only they could run): the pool replaces the generators and sends those again."""
        import ray

        r = _Run(deque(chunks), list(range(len(self.gens))))
        while r.queue or r.inflight:
            self._start_free(r)
            ready, _ = ray.wait(list(r.inflight), num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(list(r.inflight), num_returns=len(r.inflight), timeout=0)
            for ref in ready:
                self._landed(r, ref)
            self._check_overdue(r)
        joined = None
        if r.scored:  # joined where they lie: the driver fetches one object per run
            joined = self.scorers[self._joiner].__ray_call__.remote(join_scores, *r.scored)
        dead = sorted(self.first + local for local in r.dead)
        return {"chunks": r.out, "scores": joined, "dead": dead, "lost": r.lost}, r.batches

    def _start_free(self, r: _Run) -> None:
        """Start queued chunks on free generators (a pinned chunk waits for its own)."""
        waiting: deque = deque()
        while r.queue and r.free:
            c = r.queue.popleft()
            local = c["pinned"] if c["pinned"] is not None else r.free[0]
            if local not in r.free:
                waiting.append(c)
                continue
            r.free.remove(local)
            batch, info = (
                self.gens[local]
                .generate_chunk.options(num_returns=2)
                .remote(c["items"], c["n"], c["greedy"], c["strict"], c["seed"])
            )
            r.inflight[info] = (c, local, batch, time.monotonic())
        waiting.extend(r.queue)
        r.queue = waiting

    def _landed(self, r: _Run, ref: Any) -> None:
        """A chunk that finished: handed to a reward actor, or lost with its generator."""
        import ray
        from ray.exceptions import RayActorError

        c, local, batch, _ = r.inflight.pop(ref)
        try:
            info = ray.get(ref)
        except RayActorError:  # the generator died: it takes no more chunks
            r.dead.add(local)
            r.lost.append(c["id"])
            stuck = [q for q in r.queue if q["pinned"] == local or len(r.dead) == len(self.gens)]
            r.lost += [q["id"] for q in stuck]
            r.queue = deque(q for q in r.queue if q not in stuck)
            return
        r.free.append(local)
        if self.scorers and not c["greedy"]:
            self._turn += 1
            r.scored.append(self.scorers[self._turn % len(self.scorers)].score.remote(batch))
        r.out.append(
            {"id": c["id"], "actor": self.first + local, "info": info, "position": len(r.batches)}
        )
        r.batches.append(batch)

    def _check_overdue(self, r: _Run) -> None:
        now = time.monotonic()
        for c, local, _, since in r.inflight.values():
            if now - since > self.timeout_s:
                raise ActorFailure(
                    f"{self.name} {self.first + local} did not finish chunk {c['id']} "
                    f"({len(c['items'])} prompts x {c['n']} samples) within "
                    f"{self.timeout_s:g}s (rollout.timeout_s); the generator may hang. "
                    "Raise rollout.timeout_s for long generations, or check its log"
                )


@dataclass
class _Run:
    """One ``run``'s state: chunks queued, free generators (group indices), chunks in flight
    (info ref -> (chunk, generator, batch ref, start)), and what it returns."""

    queue: deque
    free: list[int]
    inflight: dict[Any, tuple[dict[str, Any], int, Any, float]] = field(default_factory=dict)
    out: list[dict[str, Any]] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)
    scored: list[Any] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)
    lost: list[int] = field(default_factory=list)


def start_dispatchers(gens: list[Any], group: int, name: str, timeout_s: float) -> list[Any]:
    """One ``Dispatcher`` per ``group`` consecutive generators (no CPU reserved: it waits
    on Ray almost all the time), started and answering."""
    import ray

    from rlalign_ray.runtime.cluster import worker_env
    from rlalign_ray.runtime.placement import get

    cls = ray.remote(Dispatcher).options(
        num_cpus=0, runtime_env={"env_vars": worker_env(cpu_only=True)}
    )
    out = [cls.remote(gens[i : i + group], i, name, timeout_s) for i in range(0, len(gens), group)]
    get([d.ping.remote() for d in out], f"{name} dispatchers", 600.0)
    return out


def join_scores(actor: Any, *shards: Any) -> tuple[Any, list[int]]:
    """Run on a reward actor (``__ray_call__``): ``shards`` joined into one ScoredShard, and
    per row the response width of its own shard (the driver narrows the rows it picks to the
    widest of theirs)."""
    from rlalign_ray.data.batch import ScoredShard

    widths = [s.response_mask.shape[1] for s in shards for _ in range(len(s))]
    return ScoredShard.concat(list(shards)), widths
