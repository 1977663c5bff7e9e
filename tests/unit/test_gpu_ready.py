"""What a first GPU run needs, checked on CPU: layouts and math refused at check-config
with the key named, devices never silently swapped, rows never silently dropped, buckets
that keep layers whole, transports chosen by where the actors' GPUs are."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rlalign_ray.config import SyncConfig, config_from_dict
from rlalign_ray.errors import ConfigError, RlalignError, WeightSyncError
from rlalign_ray.models.loading import default_device
from rlalign_ray.roles import split_rows
from rlalign_ray.sync.buckets import plan_buckets
from rlalign_ray.sync.weight_sync import WeightSync

REWARD = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]
COLOCATED = {
    "rollout": {
        "num_actors": 1,
        "resources": {"num_gpus": 0.5},
        "placement": {"colocate_with": "learner"},
    },
    "learner": {"resources": {"num_gpus": 0.5}},
}


def problems(raw: dict) -> list[str]:
    try:
        config_from_dict({"reward": {"rewards": REWARD}, **raw})
    except ConfigError as e:
        return e.problems
    return []


def test_check_config_refuses_nccl_with_a_generator_on_learner_rank0s_gpu():
    args = [
        f"{k}={v}"
        for k, v in {
            "rollout.num_actors": 1,
            "rollout.placement.colocate_with": "learner",
            "rollout.resources.num_gpus": 0.5,
            "learner.resources.num_gpus": 0.5,
            "sync.transport": "collective",
        }.items()
    ]
    out = subprocess.run(
        [sys.executable, "-m", "rlalign_ray.cli", "check-config", "configs/demo_cpu.yaml", *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "sync.transport: collective (NCCL) cannot include generator 0" in out.stderr
    assert "Traceback" not in out.stderr
    assert problems(COLOCATED) == []  # auto: CUDA IPC for the colocated generator
    gloo = {**COLOCATED, "sync": {"transport": "collective", "backend": "gloo"}}
    assert problems(gloo) == []


def test_fractional_colocated_bundles_above_one_gpu_are_refused():
    raw = {**COLOCATED, "learner": {"resources": {"num_gpus": 1}}}
    (p,) = problems(raw)
    assert p.startswith("learner.placement: bundle 0 of learner holds 1.5 GPUs")
    assert "rollout.resources.num_gpus=0.5" in p
    whole = {**raw, "rollout": {**COLOCATED["rollout"], "resources": {"num_gpus": 1}}}
    assert problems(whole) == []  # 2 GPUs: one each


def test_cuda_ipc_needs_colocated_generators():
    (p,) = problems({"sync": {"transport": "cuda_ipc"}})
    assert p.startswith("sync.transport: cuda_ipc")
    assert problems({**COLOCATED, "sync": {"transport": "cuda_ipc"}}) == []


@pytest.mark.parametrize(
    "raw, names",
    [
        ({"algorithm": {"use_behaviour_logprobs": True}}, "use_behaviour_logprobs"),
        ({"algorithm": {"behaviour_seq_mask": [0.5, 2.0]}}, "behaviour_seq_mask"),
        ({"trainer": {"max_staleness": 1}}, "behaviour_is_cap"),
    ],
)
def test_truncated_sampling_with_behaviour_logprobs_as_probabilities_is_refused(raw, names):
    assert problems(raw) == []
    for trunc in ({"top_p": 0.9}, {"top_k": 20}):
        got = problems({**raw, "rollout": trunc})
        assert len(got) == 1 and got[0].startswith("rollout.top_p=") and names in got[0]
    plain = problems({"rollout": {"top_p": 0.9}})
    assert plain == []  # the learner's own old log-probs: nothing biased
    in_reward = {"name": "reinforce_pp", "kl_in_reward": True, "kl_coef": 0.1}
    # the in-reward KL uses the learner's own old log-probs too: nothing biased
    assert problems({"algorithm": in_reward, "rollout": {"top_p": 0.9}}) == []


def test_k1_as_a_kl_loss_term_is_refused_but_not_in_the_reward():
    (p,) = problems({"algorithm": {"kl_coef": 0.05, "kl_estimator": "k1"}})
    assert p.startswith("algorithm.kl_estimator: k1 as a loss term")
    for est in ("k2", "k3"):
        assert problems({"algorithm": {"kl_coef": 0.05, "kl_estimator": est}}) == []
    raw = {
        "algorithm": {
            "name": "reinforce_pp",
            "kl_coef": 0.05,
            "kl_estimator": "k1",
            "kl_in_reward": True,
        }
    }
    assert problems(raw) == []


def test_an_actor_that_asked_for_gpus_but_sees_none_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RlalignError, match="learner.resources.num_gpus asks for 1 GPU"):
        default_device(1, "learner.resources.num_gpus")
    assert default_device(0).type == "cpu"


def test_rows_are_never_dropped_silently():
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
        split_rows(7, 2, seed=0, step=1)
    from rlalign_ray.pools import LearnerGroup

    cfg = config_from_dict(
        {"reward": {"rewards": REWARD}, "learner": {"world_size": 2, "micro_batch_size": 4}}
    )
    group = LearnerGroup(cfg)
    group.check_split(32)
    for n in (30, 16, 0):
        with pytest.raises(ValueError, match=f"a batch of {n} rows does not split"):
            group.check_split(n)


def test_buckets_never_split_a_layer():
    layout = [("model.embed_tokens.weight", (40,))]
    for i in range(3):
        layout += [(f"model.layers.{i}.q.weight", (30,)), (f"model.layers.{i}.k.weight", (30,))]
    layout += [("model.norm.weight", (10,))]
    buckets = plan_buckets(layout, torch.float32, 4 * 70)
    layers = [{n.split(".")[2] for n in b.names if ".layers." in n} for b in buckets]
    assert all(len(s) <= 1 for s in layers)
    assert [n for b in buckets for n in b.names] == [n for n, _ in layout]


def test_auto_picks_cuda_ipc_for_colocated_generators_and_nccl_otherwise():
    sync = WeightSync(SyncConfig(), "bfloat16", [], [])
    assert sync._auto_transport(0, [0, 1, 2]) == "cuda_ipc"  # every generator on a rank's GPU
    assert sync._auto_transport(0, [-1, -1]) == "collective"  # GPUs of their own
    assert sync._auto_transport(0, [-1, 1]) == "collective"  # rank 1 is not in the group
    with pytest.raises(WeightSyncError, match="colocate every generator"):
        sync._auto_transport(0, [0, -1])
    with pytest.raises(WeightSyncError, match="NCCL refuses two ranks on one GPU"):
        sync._check_layout("collective", "nccl", [0])
    with pytest.raises(WeightSyncError, match=r"generators \[1\] do not share"):
        sync._check_layout("cuda_ipc", "nccl", [0, -1])
    sync._check_layout("collective", "gloo", [0])


def _check_config(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlalign_ray.cli", "check-config", "configs/demo_cpu.yaml"]
        + list(overrides),
        capture_output=True,
        text=True,
    )


def test_check_config_refuses_fractional_generators_that_are_not_colocated_under_nccl():
    """Ray packs fractional actors onto one GPU: two generators' NCCL ranks could share it."""
    out = _check_config("rollout.num_actors=2", "rollout.resources.num_gpus=0.5")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "rollout.resources.num_gpus: 0.5 GPU per generator, not colocated" in out.stderr
    for key in ("rollout.placement.colocate_with", "sync.transport: auto", "Duplicate GPU"):
        assert key in out.stderr, key
    fractional = {"rollout": {"num_actors": 2, "resources": {"num_gpus": 0.5}}}
    assert len(problems({**fractional, "sync": {"transport": "collective"}})) == 1
    for fine in (
        {"sync": {"transport": "object_store"}},
        {"sync": {"transport": "collective", "backend": "gloo"}},
        {"rollout": {"num_actors": 2, "resources": {"num_gpus": 1}}},
    ):
        assert problems({**fractional, **fine}) == [], fine
    assert problems(COLOCATED) == []  # colocated fractions: CUDA IPC, no NCCL group


def test_the_gpu_layout_checks_cover_named_generator_pools():
    """A second generator pool (``pools.gen_b``) is checked as the default one is: on
    fractional GPUs of its own under NCCL, or on learner rank 0's GPU with collective."""
    gen_b = {"kind": "generator", "num_actors": 2, "resources": {"num_gpus": 0.5}}
    (msg,) = problems({"pools": {"gen_b": gen_b}, "sync": {"transport": "collective"}})
    assert msg.startswith("pools.gen_b.resources.num_gpus: 0.5 GPU per generator"), msg
    on_rank0 = {**gen_b, "num_actors": 1, "placement": {"colocate_with": "learner"}}
    raw = {**COLOCATED, "pools": {"gen_b": on_rank0}, "sync": {"transport": "collective"}}
    raw["rollout"] = {"num_actors": 1, "resources": {"num_gpus": 1}}
    found = problems(raw)
    assert any("cannot include gen_b 0: pools.gen_b.placement" in p for p in found), found
    assert problems({"pools": {"gen_b": {**gen_b, "resources": {"num_gpus": 1}}}}) == []


def test_setup_refuses_generators_whose_nccl_ranks_share_a_gpu():
    from rlalign_ray.sync.weight_sync import _check_distinct_gpus

    _check_distinct_gpus(["L"], [["A"], ["B", "C"]], [1, 2])  # one rank per GPU
    with pytest.raises(WeightSyncError, match=r"generator 0, generator 1 on GPU A") as e:
        _check_distinct_gpus(["L"], [["A"], ["A"]], [1, 1])
    assert "rollout.resources.num_gpus: 1" in str(e.value)
    with pytest.raises(WeightSyncError, match=r"learner rank 0, generator 1 on GPU L"):
        _check_distinct_gpus(["L", "X"], [["A"], ["B", "L"]], [1, 2])  # its 2nd TP worker
    _check_distinct_gpus(["L"], [["A", "L"]], [1])  # a TP=1 engine uses its first GPU only


def test_weights_beyond_float16s_range_are_refused_before_they_travel_as_inf():
    """A bfloat16 (or float32) learner with float16 generators: the cast would give inf."""
    from rlalign_ray.sync.buckets import check_half_range

    names = ["a", "b", "c"]
    fine = [torch.full((3,), 6e4, dtype=torch.bfloat16), torch.ones(2), torch.empty(0)]
    check_half_range(names, fine)
    big = [fine[0], torch.tensor([1.0, -7e4]), fine[2]]
    with pytest.raises(WeightSyncError, match=r"b holds -?7e\+04, beyond float16's range"):
        check_half_range(names, big)
    check_half_range(["h"], [torch.full((2,), 6e4, dtype=torch.float16)])  # already half


def test_gpu_ids_come_from_what_ray_assigned():
    from rlalign_ray.models.loading import gpu_index

    assert gpu_index(["3"], "3") == 0  # Ray set CUDA_VISIBLE_DEVICES to its GPU
    assert gpu_index(["5", "6"], "5,6") == 0
    assert gpu_index(["3"], "1,3") == 1  # the visible devices include others
    assert gpu_index(["3"], None) == 3  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES


def test_gpu_actors_run_deepspeed_on_cuda():
    from rlalign_ray.runtime.cluster import worker_env

    assert worker_env(cpu_only=False)["DS_ACCELERATOR"] == "cuda"
    assert worker_env(cpu_only=True)["DS_ACCELERATOR"] == "cpu"


def test_gpu_check_without_cuda_exits_2_at_once():
    """Refused before it builds a model or starts Ray or vLLM."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    out = subprocess.run(
        ["bash", "launch/gpu_check.sh"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out
    assert "gpu_check.sh: no CUDA GPU" in out.stderr and out.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_check_reads_reload_weights_signature_and_sets_its_log_level_first():
    from rlalign_ray.rollout.vllm_backend import lacks_reload

    class OldRunner:  # a release whose reload takes no weights
        def reload_weights(self, weights_path: str | None = None) -> None: ...

    assert lacks_reload(OldRunner).startswith("OldRunner.reload_weights(weights_iterator")
    # the level vLLM reads (when imported, and for each engine's logging config) is set
    # before the check imports vLLM
    code = (
        "import sys; from rlalign_ray.rollout.vllm_backend import check_vllm_version; "
        "assert 'vllm' not in sys.modules; check_vllm_version(); "
        "from vllm.config.logging import LoggingConfig; print(LoggingConfig().log_level)"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "ERROR"
