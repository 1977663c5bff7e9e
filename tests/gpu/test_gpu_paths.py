"""The GPU paths of a first run, on one CUDA GPU and without Ray (run where a GPU is:
``DS_ACCELERATOR=cuda python -m pytest -q tests/gpu``; skipped elsewhere):

- a learner rank (DeepSpeed, NCCL) on a model with dropout in its config: PPO's ratio is
  exactly 1 on the first mini-batch (and is not with ``model.keep_dropout``);
- the colocated layout's weight sync: a ZeRO-3 learner rank and an HF generator in two
  processes on one GPU, through CUDA IPC: the generator holds the learner's weights, and
  the rank's IPC buffers are freed once it does;
- an actor that asked for a GPU gets it.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from rlalign_ray.models.tiny import build_tiny_model
    from tests.helpers.dropout import tiny_with_dropout

    plain = tmp_path_factory.mktemp("tiny")
    build_tiny_model(str(plain))
    return tiny_with_dropout(str(plain), str(tmp_path_factory.mktemp("tiny-dropout")))


def test_default_device_is_the_gpu_an_actor_asked_for():
    from rlalign_ray.models.loading import default_device

    assert default_device(1, "learner.resources.num_gpus").type == "cuda"


@pytest.mark.parametrize("keep", [False, True])
def test_first_minibatch_ratio_is_one_on_gpu(model_dir, keep):
    from tests.helpers.subproc import run_helper

    got = run_helper("dropout", model_dir, str(int(keep)), "cuda", accelerator="cuda")
    print("dropout", keep, got)
    if keep:
        assert got["approx_kl"] > 1e-6 and got["value_gap"] > 1e-6
    else:
        assert got["approx_kl"] == 0.0 and got["clipfrac"] == 0.0 and got["value_gap"] == 0.0


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_colocated_sync_through_cuda_ipc(model_dir, zero_stage):
    from tests.helpers.gpu_sync import generator_side, learner_side

    os.environ["DS_ACCELERATOR"] = "cuda"
    ctx = mp.get_context("spawn")
    to_gen, to_learner, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=learner_side, args=(model_dir, zero_stage, to_gen, to_learner)),
        ctx.Process(target=generator_side, args=(model_dir, to_gen, to_learner, out)),
    ]
    for p in procs:
        p.start()
    try:
        got = out.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    print("cuda_ipc", zero_stage, got)
    assert got["device"].startswith("cuda") and got["names"]
    assert got["max_diff"] == 0.0
    assert got["freed"] >= 0.9  # the IPC buffers' memory, once the generator holds it
    assert all(p.exitcode == 0 for p in procs)
