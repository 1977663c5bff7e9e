"""Bookkeeping for actors that die, without Ray: a replaced generator's chunks are queued
again unchanged, and the sample ledger lists each trained sample once."""

from __future__ import annotations

import torch
from test_pools import FakeActor, _items, _pool

from rlalign_ray.ledger import SampleLog, read
from rlalign_ray.pools.base import ActorPool
from rlalign_ray.trainers.step_rows import sample_rows


def test_a_replaced_generator_gets_its_chunks_again_first(monkeypatch):
    log: list = []
    pool = _pool(2, log)
    replaced = []

    def fake_replace(self, index):  # ActorPool.replace without Ray: a new actor, then hooks
        self.actors[index] = FakeActor(log, index)
        self.replaced(index)
        for hook in self.on_replace:
            hook(index)

    monkeypatch.setattr(ActorPool, "replace", fake_replace)
    pool.on_replace.append(lambda i: (replaced.append(i), pool.versions.__setitem__(i, 4)))
    pool.versions = [4, 4]
    chunks = pool.submit(pool.chunks(_items(6), n=2, step=5, chunk_size=2, seed=3))
    for c in chunks[:2]:
        pool.inflight[c.info_ref] = c
    before = [(c.id, [it.index for it in c.items], c.seed) for c in chunks]
    assert [c.actor for c in chunks[:2]] == [0, 1] and list(pool.queue) == [chunks[2]]
    pool.replace(1)  # generator 1 died with chunk 1 in flight
    assert replaced == [1]
    # the new actor takes it at once (ahead of the waiting chunk), at the version the
    # hooks gave it; the prompts, sample indices and seed are unchanged
    assert chunks[1].actor == 1 and chunks[1].version == 4 and log[-1] == (1, [2, 3])
    assert list(pool.queue) == [chunks[2]] and pool.load == [1, 1]
    assert [(c.id, [it.index for it in c.items], c.seed) for c in chunks] == before
    assert sum(c is chunks[1] for c in pool.inflight.values()) == 1


def test_sample_rows_follow_the_chunks_and_the_rows_kept(tmp_path):
    chunks = _pool(2, []).chunks(_items(3), n=2, step=1, chunk_size=2, seed=1)
    for c, (actor, version) in zip(chunks, [(1, 7), (0, 6)]):
        c.actor, c.version = actor, version
    rows = sample_rows(chunks, None)
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert [(r["generator"], r["version"]) for r in rows] == [(1, 7)] * 4 + [(0, 6)] * 2
    kept = sample_rows(chunks, torch.tensor([4, 5, 0, 1]))
    assert [(r["prompt_index"], r["sample_index"]) for r in kept] == [
        (2, 0),
        (2, 1),
        (0, 0),
        (0, 1),
    ]
    # the ledger keeps a resumed run's lines up to the checkpoint
    out = tmp_path / "run"
    ledger = SampleLog(out, -1)
    for step in (1, 2, 3):
        ledger.write(step, rows)
    ledger.rewind(2)
    ledger.write(3, kept)
    ledger.close()
    assert [r["step"] for r in read(out)] == [1] * 6 + [2] * 6 + [3] * 4
    SampleLog(out, 1).close()
    assert [r["step"] for r in read(out)] == [1] * 6
