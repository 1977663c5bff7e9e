"""A learner rank and a generator backend in two processes on one GPU, synced through
CUDA IPC (``CudaIpcTransport``): the colocated layout, without Ray (tests/gpu)."""

from __future__ import annotations

from typing import Any

import torch

DTYPE = "float32"


def learner_side(model_path: str, zero_stage: int, to_gen: Any, from_gen: Any) -> None:
    """Train one step (the weights move off their initial values), publish every bucket's
    IPC handle, keep the buffers until the generator is done, free them (the GPU memory
    they held goes back), then send the weights."""
    from rlalign_ray.config import config_from_dict
    from rlalign_ray.sync.buckets import plan_buckets
    from rlalign_ray.sync.plan import SyncPlan
    from tests.helpers.dropout import trained_rank

    cfg = config_from_dict(
        {
            "model": {"path": model_path},
            "reward": {"rewards": [{"path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]},
            "rollout": {"prompts_per_step": 2, "n_samples": 4},
            "learner": {
                "micro_batch_size": 4,
                "optimizer": "sgd",
                "lr": 0.5,
                "zero_stage": zero_stage,
                "resources": {"num_gpus": 1},
            },
        }
    )
    learner, _, _ = trained_rank(cfg)
    layout = learner.weight_layout()
    plan = SyncPlan(
        "cuda_ipc",
        "nccl",
        DTYPE,
        plan_buckets(layout, torch.float32, 1 << 16),
        60.0,
        2,
        owners=(0,),
    )
    learner.open_weight_sync(plan)
    learner.join_weight_sync(None)
    to_gen.put(plan)
    for b in range(len(plan.buckets)):
        to_gen.put(learner.publish_weights(b))
    assert from_gen.get(timeout=300) == "loaded"
    held = torch.cuda.memory_allocated()
    learner.release_weight_buffers()  # what WeightSync does once every generator holds it
    to_gen.put((held - torch.cuda.memory_allocated()) / plan.num_bytes)
    to_gen.put(learner.get_weights())  # numpy arrays: pickled by value


def generator_side(model_path: str, from_learner: Any, to_learner: Any, out: Any) -> None:
    """An HF backend on the same GPU loads every bucket from the learner's IPC handles."""
    from types import SimpleNamespace

    from rlalign_ray.config import ModelConfig, Resources, RolloutConfig
    from rlalign_ray.models.loading import load_tokenizer
    from rlalign_ray.rollout.backend import HFBackend
    from rlalign_ray.sync.cuda_ipc import CudaIpcTransport
    from rlalign_ray.sync.plan import WeightHandle

    rollout = RolloutConfig(resources=Resources(num_gpus=1), dtype=DTYPE)
    backend = HFBackend(ModelConfig(path=model_path), rollout, load_tokenizer(model_path))
    plan = from_learner.get(timeout=300)
    transport = CudaIpcTransport(plan)
    transport.connect(None, 1)
    for b in range(len(plan.buckets)):
        transport.receive(WeightHandle(1, b, [from_learner.get(timeout=300)]), backend)
    to_learner.put("loaded")
    held = {n: p.detach().float().cpu() for n, p in backend.named_parameters()}
    freed = from_learner.get(timeout=300)
    sent = from_learner.get(timeout=300)
    out.put(
        SimpleNamespace(
            device=str(next(iter(backend.named_parameters()))[1].device),
            max_diff=max(float((held[n] - torch.from_numpy(sent[n])).abs().max()) for n in sent),
            names=sorted(sent) == sorted(held),
            freed=freed,
        ).__dict__
    )
