"""The simulated actors of ``bench pipeline --simulate`` and ``bench scale``: their timing
model, the values they hand back, that generator and reward processes stay torch-free, and
how ``bench scale`` hosts many of them in one process (``bench/hosted.py``)."""

from __future__ import annotations

import asyncio
import copy
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rlalign_ray.bench.hosted import HostedActor, SimHost, _ray_call, host_count, hosted
from rlalign_ray.bench.simulated import (
    SimulatedGenerator,
    SimulatedLearner,
    SimulatedRewardScorer,
    Workload,
)
from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.errors import ActorFailure, ConfigError
from rlalign_ray.sync.buckets import plan_buckets
from rlalign_ray.sync.plan import SyncPlan, WeightHandle


def test_workload_parses_times_and_a_lognormal_tail():
    w = Workload.parse("gen=0.2,train=0.3,tail=lognormal:1.0,reward=0.01", 256, 4)
    assert (w.gen_s, w.train_s, w.tail_sigma, w.reward_s) == (0.2, 0.3, 1.0, 0.01)
    assert w.row_s == pytest.approx(0.2 * 4 / 256)
    for bad in ("gen=-1", "speed=2", "tail=normal:1", "gen"):
        with pytest.raises(ConfigError, match="--simulate"):
            Workload.parse(bad, 1, 1)


def test_length_factors_have_mean_one_and_depend_only_on_prompt_and_sample():
    w = Workload.parse("gen=1,tail=lognormal:1.0", 8, 1)
    factors = [f for i in range(3000) for f in w.factors(i, 4)]
    assert sum(factors) / len(factors) == pytest.approx(1.0, abs=0.08)
    assert w.factors(7, 4) == w.factors(7, 4)
    assert Workload.parse("gen=1", 8, 1).factors(7, 3) == [1.0, 1.0, 1.0]
    # a chunk costs its rows times its longest sample
    assert w.chunk_s([1.0, 3.0]) == pytest.approx(w.row_s * 2 * 3.0)


def test_the_actors_answer_as_the_real_ones_do():
    work = Workload.parse("gen=0,train=0", 4, 1)
    gen = type("SimulatedGenerator", (SimulatedGenerator,), {"work": work})(None, None, 0, 3)
    items = [PromptItem(5, "a"), PromptItem(9, "b")]
    batch, info = gen.generate_chunk(items, 2, expected_version=0)
    assert batch.group_ids == [5, 5, 9, 9] and len(batch) == 4
    assert info["version"] == 0 and info["rows"] == 4 and info["tokens"] == sum(batch.lengths)
    plan = SyncPlan("object_store", "gloo", "float32", plan_buckets([("w", (1,))], _f32(), 4), 1, 2)
    gen.join_weight_sync(plan, None, 1)
    assert gen.load_weights(WeightHandle(1, 0)) == 1 == gen.get_version()
    with pytest.raises(ActorFailure, match="holds weight version 1"):
        gen.generate_chunk(items, 2, expected_version=0)
    shard = pickle.loads(pickle.dumps(SimulatedRewardScorer(None).score(batch)))
    assert isinstance(shard, ScoredShard) and len(shard) == 4
    assert shard.response_mask.shape == (4, max(batch.lengths))
    learner = SimulatedLearner(None, 0, 1)
    assert learner.split_batches([[0, 1], [2, 3]], None, 1, batch) == [
        {"rows": 2, "versions": [0]},
        {"rows": 2, "versions": [0]},
    ]


def _f32():
    import torch

    return torch.float32


def test_generator_and_reward_processes_need_no_torch():
    """What the driver sends a generator (prompts, the sync plan, weight handles) and what a
    reward actor receives unpickle without importing torch (nor does a host's module)."""
    plan = SyncPlan("object_store", "gloo", "float32", plan_buckets([("w", (1,))], _f32(), 4), 1, 2)
    work = Workload.parse("gen=0", 1, 1)
    gen = type("SimulatedGenerator", (SimulatedGenerator,), {"work": work})(None, None, 0)
    batch, _ = gen.generate_chunk([PromptItem(0, "p")], 1)
    payload = pickle.dumps([PromptItem(0, "p"), plan, WeightHandle(1, 0), batch])
    code = (
        "import pickle, sys; import rlalign_ray.bench.simulated, rlalign_ray.runtime.dispatch; "
        "import rlalign_ray.bench.hosted; "
        f"pickle.loads({payload!r}); print('torch' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "False"


# ---- hosted simulated actors (bench/hosted.py) -------------------------------------------
class _Recorder:
    """A simulated actor that notes its calls and how many of them ran at once."""

    def __init__(self, name: str):
        self.name, self.seen, self.running, self.most = name, [], 0, 0

    def note(self, x: Any) -> list:
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.01)
        self.seen.append(x)
        self.running -= 1
        return list(self.seen)


def test_a_host_runs_each_callers_calls_in_order_one_at_a_time():
    host = SimHost(_Recorder, 2)

    async def go() -> None:
        await host.call(0, 7, 0, None, "generator 0", ("a",))  # the constructor: seq 0
        await host.call(1, 9, 0, None, "generator 1", ("b",))
        # caller 7's seq 2 and 3 arrive before its seq 1: held back until 1 is queued
        late = [asyncio.ensure_future(host.call(0, 7, s, "note", s)) for s in (3, 2)]
        other = asyncio.ensure_future(host.call(1, 9, 1, "note", "other member"))
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in late) and (await other) == ["other member"]
        assert await host.call(0, 7, 1, "note", 1) == [1]
        assert [await f for f in late] == [[1, 2, 3], [1, 2]]
        await host.skip(0, 7, 4)  # a submission that failed: the next one still runs
        assert await host.call(0, 7, 5, lambda obj, k: (obj.name, k), 6) == ("a", 6)
        # another caller's first call (a pickled copy of the handle) starts at 0
        assert await host.call(0, 11, 0, "note", "copy") == [1, 2, 3, "copy"]
        assert host.members[0].most == 1 and await host.ping() == 2
        await host.retire(0)
        with pytest.raises(ActorFailure, match="generator 0 was killed"):
            await host.call(0, 7, 6, "note", "after")

    asyncio.run(go())


class _Method:
    def __init__(self, log: list, name: str, opts: dict | None = None, fail: bool = False):
        self.log, self.name, self.opts, self.fail = log, name, opts or {}, fail

    def options(self, **opts: Any) -> _Method:
        return _Method(self.log, self.name, opts, self.fail)

    def remote(self, *args: Any) -> str:
        if self.fail and args[3] == "bad":
            raise TypeError("cannot serialize")
        self.log.append((self.name, self.opts, args))
        return "ref"


class _Host:
    """Stands in for a SimHost's Ray handle: records what each call would send."""

    def __init__(self):
        self.log: list = []
        self.call = _Method(self.log, "call", fail=True)
        self.skip = _Method(self.log, "skip")


def test_a_hosted_handle_makes_one_host_call_per_call_with_its_sequence_number():
    host = _Host()
    a = HostedActor(host, 3, "generator 7")
    assert a.generate_chunk.options(num_returns=2).remote("items", 2) == "ref"
    a.__ray_call__.remote(len)
    with pytest.raises(TypeError):
        a.bad.remote()
    a.ping.remote()
    caller = a._caller
    assert host.log == [
        ("call", {"num_returns": 2}, (3, caller, 0, "generate_chunk", "items", 2)),
        ("call", {}, (3, caller, 1, _ray_call, len)),
        ("skip", {}, (3, caller, 2)),  # the failed submission's number, given up
        ("call", {}, (3, caller, 3, "ping")),
    ]
    b = copy.copy(a)  # as pickling into another process: a new caller, from 0
    b.ping.remote()
    assert host.log[-1] == ("call", {}, (3, b._caller, 0, "ping")) and b._caller != caller
    with pytest.raises(ActorFailure, match="only \\['num_returns'\\]"):
        a.ping.options(max_task_retries=2)
    with pytest.raises(AttributeError):
        a._ray_actor_id  # noqa: B018 (Ray's and pickle's probes are not actor methods)


def test_hosting_is_per_role_class_and_counts_its_processes():
    assert hosted(SimulatedGenerator, 0) is SimulatedGenerator
    cls = hosted(SimulatedGenerator, 32)
    assert issubclass(cls, SimulatedGenerator) and cls.per_host == 32
    assert host_count(128, 32, 3) == 7 and host_count(2, 32, 3) == 2
    assert host_count(128, 0, 3) == 128
