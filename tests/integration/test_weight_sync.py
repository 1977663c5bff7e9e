"""WeightSync on a real local Ray instance, real Generator actors and a plain model as the
source: weights arrive in the generators' dtype (bf16 from an fp32 source), a generator
that missed a version catches up, loads go through a dispatcher (``rollout.dispatch_group``),
and a dead peer ends a collective sync with an error."""

from __future__ import annotations

import numpy as np
import pytest

from rlalign_ray.config import ModelConfig, Resources, RolloutConfig, SyncConfig
from rlalign_ray.errors import ActorFailure
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.runtime.dispatch import Dispatcher
from rlalign_ray.sync.plan import WeightHandle
from rlalign_ray.sync.targets import WeightTargets
from rlalign_ray.sync.weight_sync import WeightSync

pytestmark = pytest.mark.integration


def _actors(ray, tiny_model, n):
    from helpers.weights import ChangingSource

    source = ray.remote(num_cpus=0.5)(ChangingSource).remote(tiny_model)
    rollout = RolloutConfig(dtype="bfloat16", resources=Resources(num_cpus=0.5))
    gens = [
        ray.remote(num_cpus=0.5)(Generator).remote(ModelConfig(path=tiny_model), rollout, 0, i)
        for i in range(n)
    ]
    ray.get([source.weight_layout.remote()] + [g.ping.remote() for g in gens])  # started
    return source, gens


@pytest.mark.parametrize(
    "transport",
    [
        "object_store",  # collective: test_collective_sync_with_a_dead_generator_fails_naming_it
        pytest.param("collective", marks=pytest.mark.full),
        pytest.param("shared_memory", marks=pytest.mark.full),
    ],
)
def test_generator_that_missed_a_version_catches_up_in_bf16(ray_local, tiny_model, transport):
    ray = ray_local
    source, gens = _actors(ray, tiny_model, 2)
    cfg = SyncConfig(transport=transport, bucket_mb=0.5, timeout_s=60)
    both = WeightSync(cfg, "bfloat16", [source], gens)
    first = WeightSync(cfg, "bfloat16", [source], gens[:1])
    try:
        assert len(both.setup().buckets) > 1
        assert both.sync(1) == both.plan.num_bytes
        ray.get(source.perturb.remote(1))
        first.setup()
        first.sync(2)  # generator 1 misses version 2
        assert ray.get([g.get_version.remote() for g in gens]) == [2, 1]
        ray.get(source.perturb.remote(2))
        both.setup()
        both.sync(3)
        assert ray.get([g.get_version.remote() for g in gens]) == [3, 3]
        want = ray.get(source.get_weights.remote("bfloat16"))
        for g in gens:
            got = ray.get(g.get_weights.remote())
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    finally:
        for a in [source, *gens]:
            ray.kill(a)


class Dispatched(WeightTargets):
    """Generators whose loads go through dispatchers (as a pool with
    ``rollout.dispatch_group`` hands them to the sync)."""

    def __init__(self, actors: list, dispatchers: list):
        self.actors, self.dispatchers, self.versions = actors, dispatchers, [0] * len(actors)

    def receivers(self) -> list:
        return self.actors

    def loaders(self) -> list:
        return [(f"dispatcher {i}", d) for i, d in enumerate(self.dispatchers)]

    def loaded(self, version: int) -> None:
        self.versions = [version] * len(self.actors)


@pytest.mark.parametrize(
    "transport", ["object_store", pytest.param("shared_memory", marks=pytest.mark.full)]
)
def test_sync_through_a_dispatcher_hands_generators_the_publish_result(
    ray_local, tiny_model, transport
):
    """With dispatchers the driver makes one load call per group; the dispatcher fetches the
    publish call's result (a ref the driver owns) once and its generators get the value, so
    the driver answers no request per generator. Every bucket still arrives."""
    ray = ray_local
    source, gens = _actors(ray, tiny_model, 2)
    dispatcher = ray.remote(Dispatcher).options(num_cpus=0).remote(gens, 0, "generator", 60.0)
    pool = Dispatched(gens, [dispatcher])
    cfg = SyncConfig(transport=transport, bucket_mb=0.5, timeout_s=60)
    sync = WeightSync(cfg, "bfloat16", [source], pool)
    try:
        assert len(sync.setup().buckets) > 1
        ray.get(source.perturb.remote(1))
        assert sync.sync(1) == sync.plan.num_bytes
        assert pool.versions == [1, 1]
        assert ray.get([g.get_version.remote() for g in gens]) == [1, 1]
        want = ray.get(source.get_weights.remote("bfloat16"))
        for g in gens:
            got = ray.get(g.get_weights.remote())
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        # what the dispatcher passes on: the result in place of the driver's ref
        handle = WeightHandle(1, 0, [ray.put(["result"])])
        assert handle.resolve().payload == [["result"]]
        assert handle.resolve().published(1.0) == ["result"] == handle.published(1.0)
        assert WeightHandle(1, 0).resolve() == WeightHandle(1, 0)
    finally:
        for a in [dispatcher, source, *gens]:
            ray.kill(a)


def test_collective_sync_with_a_dead_generator_fails_naming_it(ray_local, tiny_model):
    ray = ray_local
    source, gens = _actors(ray, tiny_model, 2)
    sync = WeightSync(
        SyncConfig(transport="collective", bucket_mb=0.5, timeout_s=5), "bfloat16", [source], gens
    )
    try:
        sync.setup()
        sync.sync(1)
        ray.kill(gens[1])
        with pytest.raises(ActorFailure, match="collective weight sync .version 2.*generator 1"):
            sync.sync(2)
    finally:
        for a in [source, *gens]:
            ray.kill(a)
