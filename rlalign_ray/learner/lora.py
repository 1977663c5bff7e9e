"""LoRA adapters on the policy (``learner.lora``), through peft.

The learner wraps its Hugging Face model with ``get_peft_model`` before DeepSpeed starts:
the base weights are frozen and only the adapters' parameters reach the optimizer. The
generators, the reference and every sync keep the base model's layout: what travels is
the merged weight W + scale * B @ A of each adapted layer, under the base parameter's name
(``merged_sources`` / ``merged_value``), so a generator never knows about adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from rlalign_ray.config import LoraSpec

ADAPTER = "default"  # peft's name for the one adapter


def apply_lora(model: Any, spec: LoraSpec) -> Any:
    """``model`` wrapped as a ``PeftModel`` with fresh adapters (B = 0: the policy is
    unchanged until the first update); every base parameter is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules) or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def base_name(name: str) -> str:
    """A PeftModel parameter's name in the base model:
    ``base_model.model.model.layers.0.q_proj.base_layer.weight`` -> ``model.layers.0.q_proj.weight``."""
    prefix = "base_model.model."
    name = name[len(prefix) :] if name.startswith(prefix) else name
    return name.replace(".base_layer.", ".")


def merged_sources(model: Any) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
    """``(base name, base parameter, LoRA layer or None)`` of every base parameter, in the
    model's order; the layer's delta is added to its parameter when it travels."""
    from peft.tuners.lora import LoraLayer

    layers = {
        f"{name}.base_layer.weight": m
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
    }
    for name, p in model.named_parameters():
        if not is_adapter_param(name):
            yield base_name(name), p, layers.get(name)


def adapter_params(layer: Any) -> list[torch.nn.Parameter]:
    """The parameters a layer's delta is computed from (to gather under ZeRO-3)."""
    return [] if layer is None else [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


@torch.no_grad()
def merged_value(param: torch.Tensor, layer: Any) -> torch.Tensor:
    """W, or W + scale * B @ A for an adapted layer (peft's own ``get_delta_weight``)."""
    if layer is None:
        return param.detach()
    return param.detach() + layer.get_delta_weight(ADAPTER).to(param.dtype)


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every base parameter, adapters merged, under the base model's names."""
    return {n: merged_value(p, layer).clone() for n, p, layer in merged_sources(model)}


def save_merged(model: Any, path: str) -> None:
    """A folder ``AutoModelForCausalLM.from_pretrained`` loads: the base model's config
    and the merged weights (the training model is left as it is)."""
    base = model.get_base_model()
    state = merged_state_dict(model)
    base.save_pretrained(path, state_dict=state, safe_serialization=True)
