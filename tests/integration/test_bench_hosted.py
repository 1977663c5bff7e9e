"""``bench scale``'s hosted simulated actors (``bench/hosted.py``) on a real local Ray: many
to a process, answering as Ray actors where the pools, the dispatchers and the Trainer use
them, and refusing what hosting cannot do."""

from __future__ import annotations

import os

import pytest
import torch

from rlalign_ray.bench import hosted as hosting
from rlalign_ray.bench.simulated import (
    SimulatedGenerator,
    SimulatedRewardScorer,
    Workload,
    simulated_config,
    simulated_topology,
)
from rlalign_ray.config import Resources
from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.errors import ActorFailure
from rlalign_ray.runtime import dispatch
from rlalign_ray.runtime.placement import RoleSpec, Slot, get, kill, make_actor
from rlalign_ray.sync.buckets import plan_buckets
from rlalign_ray.sync.plan import SyncPlan, WeightHandle

pytestmark = pytest.mark.integration


def _start(ray, cls: type, n: int, args) -> tuple[list, RoleSpec, object]:
    """``n`` hosted actors of ``cls`` (3 to a host) in a placement group of their own."""
    from ray.util.placement_group import placement_group

    group = placement_group([{"CPU": 0.01}] * n)
    ray.get(group.ready())
    spec = RoleSpec(cls.__name__, hosting.hosted(cls, 3), n, Resources(num_cpus=0.01), args)
    return [make_actor(spec, Slot(group, i), i) for i in range(n)], spec, group


def test_hosted_actors_share_processes_and_answer_as_ray_actors(ray_local):
    import ray
    from ray.exceptions import RayActorError
    from ray.util.placement_group import remove_placement_group

    gens, gen_spec, gen_group = _start(ray, SimulatedGenerator, 4, lambda i: (None, None, 0, i))
    scorers, _, score_group = _start(ray, SimulatedRewardScorer, 2, lambda i: (None,))
    pids = get([g.__ray_call__.remote(lambda _: os.getpid()) for g in gens], "pids", 120)
    assert pids[0] == pids[1] == pids[2] != pids[3]  # 3 to a host on this one node
    assert get([g.ping.remote() for g in gens], "ping", 60) == [0, 1, 2, 3]
    # a load queued before a chunk that expects its version: taken in order, unwaited
    buckets = plan_buckets([("w", (1,))], torch.float32, 4)
    plan = SyncPlan("object_store", "gloo", "float32", buckets, 1, 2)
    get([g.join_weight_sync.remote(plan, None, 1) for g in gens], "join", 60)
    loads = [g.load_weights.remote(WeightHandle(1, 0)) for g in gens]
    chunks = [g.generate_chunk.options(num_returns=2).remote([PromptItem(i, "p")], 2, False, 1)
              for i, g in enumerate(gens)]  # fmt: skip
    assert get(loads, "loads", 60) == [1] * 4
    assert [info["version"] for info in get([c[1] for c in chunks], "chunks", 60)] == [1] * 4
    # handles pickled into a dispatcher: it samples on them and joins scores on a scorer
    d = ray.remote(dispatch.Dispatcher).remote(gens, 0, "generator", 60.0)
    ray.get(d.score_with.remote(scorers))
    specs = [{"id": i, "items": [PromptItem(i, "p")], "n": 2, "greedy": False, "strict": 1,
              "seed": i, "pinned": None} for i in range(6)]  # fmt: skip
    summary, batches = ray.get(d.run.options(num_returns=2).remote(specs))
    joined, widths = ray.get(summary["scores"])
    assert isinstance(joined, ScoredShard) and len(joined) == len(widths) == 12
    assert len(ray.get(batches)) == 6
    ray.kill(d)
    # what hosting cannot do is refused: a replacement; a killed actor stops answering
    with pytest.raises(ActorFailure, match="are not replaced"):
        make_actor(gen_spec, Slot(gen_group, 0), 0)
    kill(gens[0])
    with pytest.raises(ActorFailure, match="was killed"):
        get(gens[0].ping.remote(), "ping", 60)
    assert get(gens[1].ping.remote(), "ping", 60) == 1
    for a in [*gens, *scorers]:  # the last of a host's actors ends its process
        kill(a)
    with pytest.raises(RayActorError):
        ray.get(gens[1].ping.remote(), timeout=60)
    assert not {a.host._actor_id.hex() for a in gens + scorers} & set(hosting.HOSTS)
    remove_placement_group(gen_group)
    remove_placement_group(score_group)


def test_the_trainer_runs_with_hosted_simulated_actors(ray_local, tmp_path):
    """The real Trainer, every generator called by the driver itself (no dispatchers: weight
    loads and chunks queued to each hosted generator must run in order), hosts stopped."""
    from rlalign_ray.bench.common import train_rows

    cfg = simulated_config(
        str(tmp_path),
        3,
        ["rollout.prompts_per_step=4", "rollout.n_samples=2", "rollout.num_actors=4",
         "rollout.chunk_size=1", "rollout.dispatch_group=0", "reward.num_actors=2",
         "learner.micro_batch_size=2", "trainer.max_staleness=1"],
    )  # fmt: skip
    topo = simulated_topology(cfg, Workload.parse("gen=0.02", cfg.batch_size, 4), per_host=3)
    assert topo.pools["generator"].cls.per_host == topo.pools["reward"].cls.per_host == 3
    assert not hasattr(topo.pools["learner"].cls, "per_host")  # a process of its own
    before = set(hosting.HOSTS)
    rows = train_rows(cfg, topo)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["time/driver_cpu_s"] > 0 for r in rows)
    assert set(hosting.HOSTS) <= before  # the run's hosts ended with its pools
