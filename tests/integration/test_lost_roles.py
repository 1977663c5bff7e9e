"""The lost-actor diagnosis pings every actor at once: one dead and one hung actor are
reported within about one timeout, not one timeout per actor."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from helpers.actors import Pinged

from rlalign_ray.runtime.placement import lost_roles

pytestmark = pytest.mark.integration


def test_lost_roles_pings_in_parallel(ray_local):
    ray = ray_local
    remote = ray.remote(num_cpus=0)(Pinged)
    ok = [remote.remote() for _ in range(3)]
    hung = [remote.remote(True) for _ in range(3)]
    dead = remote.remote()
    ray.get([a.ping.remote() for a in ok + [dead]])
    ray.kill(dead, no_restart=True)  # asynchronous: a ping sent now may still be answered
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(dead.ping.remote(), timeout=10)
            time.sleep(0.2)
        except ray.exceptions.RayActorError:
            break
    pools = {
        "generator": SimpleNamespace(actors=ok),
        "reward": SimpleNamespace(actors=hung),
        "learner": SimpleNamespace(actors=[dead, ok[0]]),
    }
    start = time.monotonic()
    text = lost_roles(pools, timeout_s=2.0)
    took = time.monotonic() - start
    assert took < 5, took  # one 2 s wait for all, not 2 s per hung actor
    assert "Roles that lost actors: learner (1 of 2 actors)" in text
    assert "Not answering within 2s: reward (3 of 3 actors)" in text
    for a in ok + hung:
        ray.kill(a, no_restart=True)
