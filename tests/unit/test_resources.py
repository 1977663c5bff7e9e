"""``rlalign-ray check-config --resources``: what each role needs (CPUs, GPUs, model memory
from the parameter count), the fit against a cluster's nodes, and the command on this
machine (no Ray)."""

from __future__ import annotations

import pytest
from conftest import REPO

from rlalign_ray.cli import main
from rlalign_ray.config import load_config
from rlalign_ray.models.sizes import ModelSize, count_parameters, model_size
from rlalign_ray.runtime.resources import GiB, Node, gpus_needed, role_needs, shortfalls

P = 1_000_000_000  # a 1B-parameter policy


def _needs(config: str, *overrides: str, params: int = P):
    cfg = load_config(str(REPO / "configs" / config), list(overrides))
    return {n.role: n for n in role_needs(cfg, lambda path, kind: ModelSize(params, "test"))}


def test_memory_per_actor_follows_the_formula():
    n = _needs("gpu_node.yaml")  # bf16, AdamW, ZeRO-2 over 4 learner ranks
    # learner: weights 2P + gradients 2P / 4 + (fp32 master 4P + moments 8P) / 4
    assert n["learner"].memory_gb == pytest.approx((2 + 2 / 4 + 12 / 4) * P / GiB)
    assert n["generator"].memory_gb == pytest.approx(2 * P / GiB)  # bf16 weights
    assert n["generator"].gpu_share == 0.85  # vLLM: its share of the GPU on top
    assert n["reference"].memory_gb == pytest.approx(2 * P / GiB)
    assert n["reward"].memory_gb == 0.0  # the math reward holds no model
    n = _needs("gpu_node_7b.yaml")  # ZeRO-3: everything split four ways
    assert n["learner"].memory_gb == pytest.approx((2 + 2 + 12) / 4 * P / GiB)
    n = _needs("demo_cpu.yaml")  # fp32, ZeRO-0, one rank: 4P + 4P + 8P
    assert n["learner"].memory_gb == pytest.approx(16 * P / GiB)
    n = _needs("demo_lora_cpu.yaml")  # LoRA: the frozen weights only
    assert n["learner"].memory_gb == pytest.approx(4 * P / GiB)


def test_parameters_are_counted_from_the_config_without_weights(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=300, tie_word_embeddings=False,
    )  # fmt: skip
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert count_parameters(config) == real
    config.save_pretrained(tmp_path)  # a folder with a config.json and no weights
    assert model_size(str(tmp_path)) == ModelSize(real, "config.json")
    assert model_size(str(tmp_path / "nope")).params is None


def test_fit_against_cluster_nodes():
    gpu_node = list(_needs("gpu_node.yaml").values())
    h100 = Node("h100", cpus=96, gpus=8, memory_gb=1500, gpu_memory_gb=80)
    assert shortfalls(gpu_node, [h100], local=False)[0] == []
    short, _ = shortfalls(gpu_node, [Node("a", 96, 4, 1500, gpu_memory_gb=80)], local=False)
    assert short == ["GPU: 8 needed, 4 in the cluster (1 live nodes)"]
    # two nodes of four GPUs hold it: every bundle is one GPU
    quads = [Node(x, 48, 4, 700, gpu_memory_gb=80) for x in "ab"]
    assert shortfalls(gpu_node, quads, local=False)[0] == []
    # 7B with ZeRO-3: 4P = 28 GiB per learner rank (P = 7.6B) does not fit a 24 GiB GPU
    big = list(_needs("gpu_node_7b.yaml", params=7_600_000_000).values())
    short, _ = shortfalls(big, [Node("l4", 96, 8, 1500, gpu_memory_gb=24)], local=False)
    assert any(s.startswith("GPU memory: each GPU of a learner bundle") for s in short), short
    # colocated: 8 GPUs hold 6.6 GPUs' worth of bundles that Ray cannot split
    colocated = list(_needs("gpu_colocated.yaml").values())
    assert gpus_needed(colocated) == 8


def test_node_types_custom_resources_and_labels():
    needs = list(
        _needs(
            "demo_cpu.yaml",
            "rollout.resources.custom={gen_slot: 1}",
            "learner.placement.node_labels={pool: train}",
        ).values()
    )
    plain = [Node("a", 8, 0, 30), Node("b", 8, 0, 30)]
    short, _ = shortfalls(needs, plain, local=False)
    assert "gen_slot: 2 needed, 0 in the cluster (2 live nodes)" in short
    assert any("learner: a bundle of" in s and "{'pool': 'train'}" in s for s in short), short
    typed = [Node("a", 8, 0, 30, {"gen_slot": 2}), Node("b", 8, 0, 30, labels={"pool": "train"})]
    assert shortfalls(needs, typed, local=False)[0] == []


def test_check_config_resources_on_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["check-config", str(REPO / "configs/demo_cpu.yaml"), "--resources"]) == 0
    out = capsys.readouterr().out
    assert "learner" in out and "this machine:" in out and "verdict: fits this machine" in out
    # 8 GPUs asked for: exit status 2, naming what is short
    code = main(["check-config", str(REPO / "configs/gpu_node.yaml"), "--resources"])
    out = capsys.readouterr().out
    if code == 0:
        pytest.skip("this machine has the 8 GPUs")
    assert code == 2 and "verdict: DOES NOT FIT" in out and "  - GPU: 8 needed" in out, out
    assert "memory estimate per actor" in out
