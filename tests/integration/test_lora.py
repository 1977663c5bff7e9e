"""A LoRA run (learner.lora) on a real local Ray instance: only the adapters train and sit
in the optimizer, generators receive the merged weights, final/ holds the adapter (and,
with trainer.save_merged, a merged model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration
pytest.importorskip("peft")


class LoraTrainer(Trainer):
    """After each broadcast, every generator holds the learner's merged weights."""

    def broadcast(self, version: int) -> int:
        import ray

        nbytes = super().broadcast(version)
        learner = self.pools["learner"].actors[0]
        merged = ray.get(learner.get_weights.remote())
        for gen in self.pools["generator"].actors:
            got = ray.get(gen.get_weights.remote())
            assert got.keys() == merged.keys()
            for name in got:
                np.testing.assert_array_equal(got[name], merged[name], err_msg=name)

        def _probe(rank):
            """On learner rank 0: what the optimizer holds and the peft model's weights."""
            from rlalign_ray.learner.lora import is_adapter_param

            held = {id(p) for g in rank.engine.optimizer.param_groups for p in g["params"]}
            named = list(rank.engine.module.named_parameters())
            return {
                "optimizer": sorted(n for n, p in named if id(p) in held),
                "adapters": sorted(n for n, _ in named if is_adapter_param(n)),
                "trainable": sorted(n for n, p in named if p.requires_grad),
                "weights": {n: p.detach().float().numpy().copy() for n, p in named},
            }

        self.merged, self.probe = merged, ray.get(learner.__ray_call__.remote(_probe))
        return nbytes


def test_lora_run_trains_only_adapters(ray_local, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlalign_ray.learner.lora import base_name, merged_state_dict

    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            learner={
                "micro_batch_size": 4,
                "lr": 1e-2,
                "resources": {"num_cpus": 0.5},
                "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
            trainer={"save_merged": True},
        )
    )
    trainer = LoraTrainer(cfg)
    trainer.fit()
    probe = trainer.probe

    # the optimizer holds exactly the adapters: layers x (q, v) x (A, B)
    assert probe["optimizer"] == probe["adapters"] == probe["trainable"]
    layers = AutoModelForCausalLM.from_pretrained(tiny_model).config.num_hidden_layers
    assert len(probe["adapters"]) == layers * 4 and all(".lora_" in n for n in probe["optimizer"])
    # the base weights are the initial ones; the adapters moved (B starts at zero)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    weights = probe["weights"]
    for name, value in weights.items():
        if ".lora_" not in name:
            np.testing.assert_array_equal(value, initial[base_name(name)].detach().numpy())
    assert all(np.abs(weights[n]).sum() > 0 for n in weights if ".lora_B." in n)
    # generators sampled with the merged weights: their log-probs are the learner's
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["train/logprob_mismatch"] < 1e-4 for r in rows[1:])
    changed = [n for n in trainer.merged if "q_proj" in n or "v_proj" in n]
    assert changed and all(
        not np.array_equal(trainer.merged[n], initial[n].detach().numpy()) for n in changed
    )

    # final/: the adapter, which PeftModel.from_pretrained loads; final/merged: a plain model
    final = tmp_path / "run/final"
    assert (final / "adapter_config.json").exists()
    assert (final / "adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final)
    plain = AutoModelForCausalLM.from_pretrained(final / "merged")
    loaded = merged_state_dict(peft_model)
    for name, p in plain.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), trainer.merged[name], atol=1e-6)
        np.testing.assert_allclose(loaded[name].numpy(), trainer.merged[name], atol=1e-6)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
