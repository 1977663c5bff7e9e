"""The generator pool's chunking and pull scheduling, without Ray (fake actors)."""

from __future__ import annotations

import time

import pytest

from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.errors import ActorFailure
from rlalign_ray.pools import GeneratorPool


class FakeMethod:
    def __init__(self, log, actor):
        self.log, self.actor = log, actor

    def options(self, **_):
        return self

    def remote(self, items, *args):
        self.log.append((self.actor, [it.index for it in items]))
        return object(), object()


class FakeActor:
    def __init__(self, log, i):
        self.generate_chunk = FakeMethod(log, i)


def _pool(n: int, log: list) -> GeneratorPool:
    pool = GeneratorPool(Config(), num_actors=n)
    pool.actors = [FakeActor(log, i) for i in range(n)]
    pool.versions, pool.load = [0] * n, [0] * n
    pool.idle_s, pool._idle_since = [0.0] * n, [0.0] * n
    return pool


def _items(n: int) -> list[PromptItem]:
    return [PromptItem(index=i, prompt=f"p{i}", columns={}) for i in range(n)]


def test_static_split_pins_one_contiguous_chunk_per_actor():
    pool = _pool(3, [])
    chunks = pool.chunks(_items(7), n=2, seed=5)
    assert [[it.index for it in c.items] for c in chunks] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [c.pinned for c in chunks] == [0, 1, 2]
    assert all(c.seed is None for c in chunks)  # each actor's own stream, as before


def test_pulled_chunks_are_seeded_and_wait_for_a_free_actor():
    log: list = []
    pool = _pool(2, log)
    chunks = pool.chunks(_items(5), n=4, step=3, chunk_size=2, seed=7)
    assert [len(c.items) for c in chunks] == [2, 2, 1] and chunks[0].rows == 8
    assert len({c.seed for c in chunks}) == 3 and all(c.pinned is None for c in chunks)
    pool.submit(chunks)
    assert log == [(0, [0, 1]), (1, [2, 3])]  # one in flight per actor: the third waits
    assert list(pool.queue) == [chunks[2]]
    # actor 1 finishes first: it pulls the waiting chunk
    pool.load[1] -= 1
    pool._dispatch()
    assert log[-1] == (1, [4]) and not pool.queue
    assert chunks[2].actor == 1 and chunks[2].version == 0


def test_front_submission_goes_before_waiting_chunks():
    log: list = []
    pool = _pool(1, log)
    train = pool.chunks(_items(4), n=1, chunk_size=1, seed=1)
    pool.submit(train)
    evals = pool.chunks(_items(2), n=1, greedy=True, chunk_size=2)
    pool.submit(evals, front=True)
    assert list(pool.queue)[0] is evals[0]


def test_a_chunk_past_rollout_timeout_names_the_generator_and_the_chunk():
    pool = _pool(2, [])
    pool.cfg.rollout.timeout_s = 5.0
    chunks = pool.submit(pool.chunks(_items(4), n=2, step=3, chunk_size=2, seed=1))
    for c in chunks:
        pool.inflight[c.id] = c
    pool.check_overdue()  # both just started
    pool._busy_since[1] = time.perf_counter() - 6.0
    with pytest.raises(ActorFailure) as err:
        pool.check_overdue()
    msg = str(err.value)
    assert "generator 1 did not finish chunk 1 (step 3, 2 prompts x 2 samples" in msg
    assert "'p2'" in msg and "5s (rollout.timeout_s)" in msg


class FakeRun:
    def __init__(self, log, g):
        self.log, self.g = log, g

    def options(self, num_returns):
        assert num_returns == 2  # the run's summary, and its list of batch refs
        return self

    def remote(self, specs):
        self.log.append((self.g, specs))
        return object(), object()


def test_dispatch_groups_send_one_run_per_group_with_balanced_chunks():
    """rollout.dispatch_group: one call per dispatcher per submission; pulled chunks spread by
    count, pinned ones to their generator's group (as a group index)."""
    log: list = []
    pool = _pool(5, [])
    pool.group = 2  # groups: generators [0, 1], [2, 3], [4]
    pool.dispatchers = [type("D", (), {"run": FakeRun(log, g)})() for g in range(3)]
    pool._group_load = [0, 0, 0]
    pool.versions = [3] * 5
    pulled = pool.chunks(_items(10), n=2, chunk_size=1, seed=1)
    pool.submit(pulled)
    assert [g for g, _ in log] == [0, 1, 2]
    assert [len(specs) for _, specs in log] == [4, 4, 2]  # per generator: 2 each
    assert all(s["strict"] == 3 and s["pinned"] is None for _, specs in log for s in specs)
    assert {c.info_ref for c in pulled} == set(pool._runs) and not pool.queue
    log.clear()
    pinned = pool.chunks(_items(5), n=1)
    pool.submit(pinned)
    assert [(g, [s["pinned"] for s in specs]) for g, specs in log] == [
        (0, [0, 1]),
        (1, [0, 1]),
        (2, [0]),
    ]
