"""A generator pool's dispatchers (``rollout.dispatch_group``): how the pool sends its chunks
to them and lands what their runs return (``runtime/dispatch.py`` is the actor). Mixed into
``GeneratorPool``: whoever uses the pool sees chunks, score handles and ``StepBatches``,
never the dispatchers.

A generator that dies inside a run is reported by its dispatcher with the chunks it took
with it; the pool replaces it (``run.max_actor_restarts``), hands its dispatcher the new
actor, and sends those chunks again, as the pull queue does for a chunk whose actor died.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rlalign_ray.errors import ActorFailure
from rlalign_ray.pools.chunks import Chunk, DispatchRun, RunRows
from rlalign_ray.runtime.placement import actor_died, get


class DispatchGroups:
    """Mixed into ``GeneratorPool`` (its ``actors``, ``dispatchers``, ``group``, ``versions``,
    ``replace`` and bookkeeping)."""

    actors: list[Any]
    dispatchers: list[Any]
    group: int
    versions: list[int]
    name: str
    timeout_s: float
    _runs: dict[Any, tuple[int, list[Chunk], Any]]
    _group_load: list[int]
    _busy_total: float

    def _dispatch_groups(self, chunks: list[Chunk]) -> None:
        """One ``run`` call per dispatcher with its share of ``chunks`` (the least loaded
        group, per generator, takes the next; pinned chunks go to their generator's group).
        A chunk samples with the version its group's generators hold once the loads queued
        so far are done (runs and loads reach a dispatcher in order)."""
        sizes = [
            len(self.actors[i : i + self.group]) for i in range(0, len(self.actors), self.group)
        ]
        per: list[list[Chunk]] = [[] for _ in self.dispatchers]
        for c in chunks:
            if c.pinned is not None:
                g = c.pinned // self.group
            else:
                g = min(range(len(sizes)), key=lambda i: self._group_load[i] / sizes[i])
            self._group_load[g] += 1
            per[g].append(c)
        now = time.perf_counter()
        for g, mine in enumerate(per):
            if not mine:
                continue
            specs = []
            for c in mine:
                c.version = self.versions[g * self.group]
                specs.append(
                    {"id": c.id, "items": c.items, "n": c.n, "greedy": c.greedy,
                     "strict": None if c.greedy else c.version, "seed": c.seed,
                     "pinned": None if c.pinned is None else c.pinned % self.group}
                )  # fmt: skip
                c.submitted_s = now
            ref, batches = self.dispatchers[g].run.options(num_returns=2).remote(specs)
            for c in mine:
                c.info_ref = ref
            self._runs[ref] = (g, mine, batches)

    def _poll_groups(self, timeout_s: float, also: Sequence[Any]) -> list[Chunk]:
        """``poll`` with dispatchers: the chunks of every ``run`` that finished."""
        import ray

        pending = list(self._runs) + list(also)
        if not pending:
            return []
        ready, _ = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if ready and self._runs and (len(self._runs) > 1 or ready[0] not in self._runs):
            ready, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=0)
        done = [r for r in ready if r in self._runs]
        if not done:
            return []
        results = get(done, f"{self.name} dispatchers", self.timeout_s)
        now, finished = time.perf_counter(), []
        for ref, landed in zip(done, results):
            g, mine, batches = self._runs.pop(ref)
            self._group_load[g] -= len(mine)
            by_id = {c.id: c for c in mine}
            run, row = DispatchRun(batches, landed["scores"], self.timeout_s), 0
            for r in landed["chunks"]:
                chunk, info = by_id[r["id"]], r["info"]
                if not chunk.greedy and info["version"] != chunk.version:
                    raise ActorFailure(
                        f"{self.name} {r['actor']} sampled chunk {chunk.id} with weight "
                        f"version {info['version']}, the pool expected {chunk.version}"
                    )
                chunk.actor, chunk.done, chunk.finished_s = r["actor"], True, now
                chunk.run, chunk.position = run, r["position"]
                if run.scores is not None and not chunk.greedy:  # rows of the joined scores
                    chunk.scored, row = RunRows(run, row, chunk.rows), row + chunk.rows
                chunk.extra["info"] = info
                self._busy_total += info.get("seconds", 0.0)
                finished.append(chunk)
            if landed.get("lost"):
                self._send_again(landed["dead"], [by_id[i] for i in landed["lost"]])
        return finished

    def _send_again(self, dead: list[int], lost: list[Chunk]) -> None:
        """Generators ``dead`` died in a run: replace those not replaced yet (a run sent
        before the first report names them too), then send the ``lost`` chunks again: the
        same prompts, sample indices and seeds, sampled with the current weights."""
        import ray

        pings = {i: self.actors[i].ping.remote() for i in dead}
        ray.wait(list(pings.values()), num_returns=len(pings), timeout=5.0)
        for i in dead:
            if actor_died(pings[i]):
                self.replace(i)  # type: ignore[attr-defined]  (past max_restarts: stops)
        for c in lost:
            c.reset()
        self._dispatch_groups(lost)
