"""Model sizes without their weights: a parameter count from a model's config.json (the model
built on PyTorch's meta device, so no memory is taken), for ``check-config --resources``."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BUILTIN_PARAMS = 1_000_000  # an upper bound for a builtin:NAME model not built yet
KINDS = ("causal", "classifier", "encoder")  # policy / reward model / embedding model


@dataclass
class ModelSize:
    params: int | None  # None: unknown (the config could not be read)
    source: str  # where the count comes from, or why it is unknown


def model_size(path: str, kind: str = "causal", trust_remote_code: bool = False) -> ModelSize:
    """The parameter count of the model at ``path`` (a folder, a hub id whose config.json is
    cached or can be fetched, or ``builtin:NAME``), from its config alone."""
    if path.startswith("builtin:"):
        from rlalign_ray.models.builtin import _is_built, builtin_model_dir

        where = builtin_model_dir(path.removeprefix("builtin:"))
        if not _is_built(where):
            return ModelSize(BUILTIN_PARAMS, f"{path}, not built yet (tiny: < 1M parameters)")
        path = where
    from transformers import AutoConfig

    path = os.path.expanduser(path)
    local = os.path.isabs(path) or path.startswith(".") or os.path.isdir(path)
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        return ModelSize(None, f"unknown: no config.json in {path}")
    for offline in (True, False) if not local else (False,):
        if not offline and not local and not hub_reachable():
            return ModelSize(None, "unknown: not in the local cache and the hub is unreachable")
        try:
            config = AutoConfig.from_pretrained(
                path, trust_remote_code=trust_remote_code, local_files_only=offline
            )
        except Exception as e:  # noqa: BLE001 - no config here: try the hub, else unknown
            error = f"unknown ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            continue
        return ModelSize(count_parameters(config, kind, trust_remote_code), "config.json")
    return ModelSize(None, error)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host answers (its client would retry for ~30 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s
        ).close()
    except OSError:
        return False
    return True


def count_parameters(config: object, kind: str = "causal", trust_remote_code: bool = False) -> int:
    """Unique parameters of the model ``config`` describes (tied weights counted once),
    built on the meta device: no weights are allocated."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {
        "causal": AutoModelForCausalLM,
        "classifier": AutoModelForSequenceClassification,
        "encoder": AutoModel,
    }[kind]
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())
