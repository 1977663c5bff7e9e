"""A weight source for sync tests: a plain model whose weights the test can change."""

from __future__ import annotations

import numpy as np
import torch

from rlalign_ray.bench.weights import ModelSource


class ChangingSource(ModelSource):
    @torch.no_grad()
    def perturb(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in self.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)

    def get_weights(self, dtype: str) -> dict[str, np.ndarray]:
        """Every parameter as the generators should hold it (cast to their dtype)."""
        return {
            n: p.detach().to(getattr(torch, dtype)).float().numpy()
            for n, p in self.model.named_parameters()
        }
