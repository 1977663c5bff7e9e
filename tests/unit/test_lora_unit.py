"""LoRA pieces without Ray: names, merged weights, config checks."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.config import LoraSpec, load_config
from rlalign_ray.errors import ConfigError

peft = pytest.importorskip("peft")


def test_merged_weights_match_peft_merge_under_base_names(tiny_model):
    from rlalign_ray.learner import lora
    from rlalign_ray.models.loading import load_causal_lm

    base = dict(load_causal_lm(tiny_model).named_parameters())
    model = lora.apply_lora(load_causal_lm(tiny_model), LoraSpec(rank=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter_param(n) for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    merged = lora.merged_state_dict(model)
    assert list(merged) == list(base)  # the base model's names, in its order
    reference = dict(model.merge_and_unload().named_parameters())
    changed = 0
    for name, value in merged.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)
        changed += not torch.equal(value, base[name])
    layers = model.config.num_hidden_layers
    assert changed == layers * 7  # every linear layer (q k v o gate up down) of each layer


def test_lora_config_checks(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", ["learner.lora.rank=8", "trainer.save_merged=true"])
    assert cfg.learner.lora.rank == 8 and cfg.learner.lora.target_modules == []
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo_cpu.yaml", ["learner.lora.rank=-1", "learner.lora.dropout=1.5"])
    assert "learner.lora.rank: must be >= 0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo_cpu.yaml", ["learner.lora.rank=4", "learner.lora.dropout=1.5"])
    assert "learner.lora.dropout: must be in [0, 1)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo_cpu.yaml", ["trainer.save_merged=true"])
    assert "trainer.save_merged: only with LoRA" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo_cpu.yaml", ["rollout.stop=['']"])
    assert "rollout.stop: stop strings must be non-empty" in str(e.value)
