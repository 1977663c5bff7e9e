"""Dispatchers (``rollout.dispatch_group``): what the driver gets from a run is what it would
get calling every actor itself, in O(1) Ray objects per run. (A full run with dispatchers
reproducing the recorded metrics is in test_pipeline.py.)"""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.bench.simulated import SimulatedGenerator, SimulatedRewardScorer
from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.data.step_batches import PickedBatches, open_batches
from rlalign_ray.runtime import dispatch

pytestmark = pytest.mark.integration


def _spec(i: int, n: int, greedy: bool = False) -> dict:
    items = [PromptItem(index=10 * i + j, prompt=f"p{i}.{j}") for j in range(1 + i % 2)]
    return {"id": i, "items": items, "n": n, "greedy": greedy, "strict": 0, "seed": i,
            "pinned": None}  # fmt: skip


def test_a_run_returns_summaries_one_scores_ref_and_its_batches(ray_local):
    """Two simulated generators, two reward actors: a run's joined scores hold the sampled
    chunks' rows in landing order (greedy chunks are not scored), the second return value
    lists every chunk's batch by position, and ``PickedBatches`` reopens them on the learner
    side."""
    import ray

    gens = [ray.remote(SimulatedGenerator).remote(None, None, 0, i) for i in range(2)]
    scorers = [ray.remote(SimulatedRewardScorer).remote(None) for _ in range(2)]
    d = ray.remote(dispatch.Dispatcher).remote(gens, 0, "generator", 60.0)
    ray.get(d.score_with.remote(scorers))
    specs = [_spec(0, 2), _spec(1, 2), _spec(2, 2, greedy=True), _spec(3, 2)]
    summary_ref, batches_ref = d.run.options(num_returns=2).remote(specs)
    summary, batches = ray.get(summary_ref), ray.get(batches_ref)
    landed = summary["chunks"]
    assert sorted(r["id"] for r in landed) == [0, 1, 2, 3]
    assert [r["position"] for r in landed] == [0, 1, 2, 3]
    assert len(batches) == 4 and all(isinstance(b, ray.ObjectRef) for b in batches)
    sampled = [r for r in landed if r["id"] != 2]
    built = [SimulatedRewardScorer(None).score(ray.get(batches[r["position"]])) for r in sampled]
    want = ScoredShard.concat([b.fn(*b.args) for b in built])
    joined, widths = ray.get(summary["scores"])
    for name in ("scores", "group_ids", "response_len", "response_mask"):
        assert torch.equal(getattr(joined, name), getattr(want, name)), name
    assert len(widths) == len(joined)
    # the learner's side: picks in the step's order (here: chunk 3, then chunk 0)
    pos = {r["id"]: r["position"] for r in landed}
    picked = PickedBatches([batches_ref], [(0, pos[3]), (0, pos[0])])
    assert picked.batch_refs(60) == [batches[pos[3]], batches[pos[0]]]
    opened, rest = open_batches(picked.layout(), (batches, "ref-logprobs"))
    assert len(opened) == 2 and rest == ["ref-logprobs"]
    assert [o.group_ids for o in opened] == [
        ray.get(batches[pos[3]]).group_ids,
        ray.get(batches[pos[0]]).group_ids,
    ]
    for a in [d, *gens, *scorers]:
        ray.kill(a)


def test_run_rows_read_as_each_chunks_own_shard_would(ray_local):
    """The driver's side: rows picked from two runs' joined scores, in the step's order,
    equal the chunks' own shards joined (ragged widths: narrowed to the widest picked),
    joined or one by one, and mixed with plain refs (chunks restored from a checkpoint)."""
    import ray

    from rlalign_ray.pools.chunks import DispatchRun, RunRows, joined_scores, open_scores

    def shard(i: int) -> ScoredShard:
        t = 1 + i % 3
        mask, s = torch.ones(2, t), torch.tensor([float(i), -float(i)])
        return ScoredShard(s, {"r": s * 2}, torch.tensor([i, i]), torch.tensor([t, t]), mask, mask)

    own = {i: shard(i) for i in range(6)}
    handles = {}
    for ids in ([0, 1, 2], [3, 4, 5]):
        scores = ray.put(dispatch.join_scores(None, *[own[i] for i in ids]))
        run = DispatchRun(None, scores, 60.0)
        for k, i in enumerate(ids):
            handles[i] = RunRows(run, 2 * k, 2)
    order = [4, 0, 3, 1]  # request order across runs; chunks 2 and 5 dropped (stale)
    want = ScoredShard.concat([own[i] for i in order])
    one_by_one = open_scores([handles[i] for i in order], "reward pool", 60.0)
    mixed = [handles[4], ray.put(own[0]), handles[3], handles[1]]
    for got in (
        joined_scores([handles[i] for i in order], "reward pool", 60.0),
        ScoredShard.concat(one_by_one),
        joined_scores(mixed, "reward pool", 60.0),
    ):
        for name in ("scores", "group_ids", "response_len", "response_mask", "logprobs"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(got.breakdown["r"], want.breakdown["r"])
    for i, shard in zip(order, one_by_one):  # each narrowed to its own width
        assert torch.equal(shard.response_mask, own[i].response_mask)


def test_a_generator_that_dies_in_a_run_is_reported_with_the_chunks_it_took(ray_local):
    """The run goes on without it: the chunks it took (and those pinned to it) come back as
    lost, with the generator's pool index, and the others land on the live generator; a
    new actor handed to the dispatcher takes the lost chunks in the next run."""
    import ray

    gens = [ray.remote(SimulatedGenerator).remote(None, None, 0, i) for i in range(2)]
    d = ray.remote(dispatch.Dispatcher).remote(gens, 4, "generator", 60.0)
    ray.get([g.ping.remote() for g in gens])
    ray.kill(gens[0])
    specs = [_spec(i, 2) for i in range(4)]
    specs[3]["pinned"] = 0  # only the dead one may run it
    summary = ray.get(d.run.options(num_returns=2).remote(specs)[0])
    assert summary["dead"] == [4]
    landed = {r["id"] for r in summary["chunks"]}
    assert set(summary["lost"]) | landed == {0, 1, 2, 3} and 3 in summary["lost"]
    assert {r["actor"] for r in summary["chunks"]} <= {5} and not set(summary["lost"]) & landed
    new = ray.remote(SimulatedGenerator).remote(None, None, 0, 0)
    ray.get(d.set_generator.remote(0, new))
    again = [_spec(i, 2) for i in summary["lost"]]
    for spec in again:
        spec["pinned"] = 0
    summary = ray.get(d.run.options(num_returns=2).remote(again)[0])
    assert summary["dead"] == [] and sorted(r["id"] for r in summary["chunks"]) == sorted(
        s["id"] for s in again
    )
    for a in [d, new, gens[1]]:
        ray.kill(a)
