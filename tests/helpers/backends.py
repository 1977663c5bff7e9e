"""Generation backends from outside the package, named by path (``tests/unit/test_backends.py``).

``EchoBackend`` is a ``GenerationBackend`` of its own (``rollout.backend:
helpers.backends:EchoBackend``): every response is its prompt's last token, repeated
``rollout.kwargs.times`` times. ``EchoType`` declares it with checks, capabilities and a
memory estimate of its own (``rollout.backend: helpers.backends:EchoType``).
"""

from __future__ import annotations

from typing import Any

import torch

from rlalign_ray.rollout.backend import Generation, GenerationBackend, SamplingParams
from rlalign_ray.rollout.backends import BackendType, Capabilities, Memory


class EchoBackend(GenerationBackend):
    def __init__(self, model_cfg: Any, rollout_cfg: Any, tokenizer: Any, max_prompt_tokens=512):
        self.tok = tokenizer
        self.eos_ids = [tokenizer.eos_token_id]
        self.times = int(rollout_cfg.kwargs.get("times", 2))

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> Generation:
        rows = [p for p in prompts for _ in range(n)]
        t = min(self.times, params.max_new_tokens)
        return Generation(
            tokens=torch.tensor([[p[-1]] * t for p in rows], dtype=torch.long),
            lengths=torch.full((len(rows),), t, dtype=torch.long),
            logprobs=torch.zeros(len(rows), t),
            truncated=torch.full((len(rows),), t == params.max_new_tokens),
        )

    def load_weights(self, weights) -> None:
        for _ in weights:
            pass

    def max_context(self) -> int:
        return 99


class EchoType(BackendType):
    description = "echoes each prompt's last token"
    backend = "helpers.backends:EchoBackend"
    capabilities = Capabilities(sleep=True)

    def check(self, rollout: Any, key: str) -> list[str]:
        times = rollout.kwargs.get("times")
        if not isinstance(times, int) or times < 1:
            return [f"{key}.kwargs.times: how often to echo, an integer >= 1, got {times!r}"]
        return []

    def memory(self, rollout: Any, on_gpu: bool) -> Memory:
        return Memory(host_gb=0.5, note="echo buffers")


class NotABackend:
    pass
