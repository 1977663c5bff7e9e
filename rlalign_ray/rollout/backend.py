"""Generation backends: turn token prompts into sampled responses with their log-probs.

``HFBackend`` samples a transformers model with its own KV-cached loop; ``VLLMBackend``
(``rollout/vllm_backend.py``) runs a vLLM engine. Both implement ``GenerationBackend``;
``rollout/backends.py`` registers them (what ``rollout.backend`` names, their config
sections and capabilities).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlalign_ray.data.batch import pad_prompts, pad_responses
from rlalign_ray.models.loading import default_device, load_causal_lm, position_ids


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False  # sample max_new_tokens whatever is emitted (benchmarks)
    seed: int | None = None  # sample from this seed (None: the backend's own random stream)
    # stop strings (vLLM semantics): a row ends with the token whose text completes one
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """Responses for a batch of prompts, right-padded."""

    tokens: torch.Tensor  # (N, T) long, pad after the end
    lengths: torch.Tensor  # (N,) long, generated tokens including EOS when emitted
    logprobs: torch.Tensor  # (N, T) float, log-prob of each sampled token, 0 on padding
    truncated: torch.Tensor  # (N,) bool, stopped by max_new_tokens
    # (N, T) long, the weight version that sampled each token, -1 on padding; only when
    # ``generate`` was given ``pause`` (in-flight updates), else None
    versions: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list[Generation], pad_id: int) -> Generation:
        if len(parts) == 1:
            return parts[0]
        versions = [g.versions for g in parts]
        return Generation(
            tokens=pad_responses([g.tokens for g in parts], pad_id),
            lengths=torch.cat([g.lengths for g in parts]),
            logprobs=pad_responses([g.logprobs for g in parts]),
            truncated=torch.cat([g.truncated for g in parts]),
            versions=None if None in versions else pad_responses(versions, -1),
        )


# ``generate``'s ``pause``: called between decode steps (a new weight version may be loaded
# meanwhile, ``rollout/inflight.py``); returns the version the next step samples with
Pause = Callable[[], int]


class GenerationBackend(ABC):
    """What a generator needs from an inference engine.

    Constructed as ``cls(model_cfg, rollout_cfg, tokenizer, max_prompt_tokens)``; loads the
    policy itself (in ``rollout_cfg.dtype or model_cfg.dtype``). Its registry entry
    (``rollout/backends.py``: ``BackendType``) declares what it can do for the config
    checks; an instance answers for itself: ``eos_ids``, ``max_context``, ``sleep``.
    """

    eos_ids: list[int]  # token ids that end a response (the model's and the tokenizer's)
    # whether ``generate`` takes ``pause`` (in-flight weight updates, rollout/inflight.py)
    inflight_updates: bool = False

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        pause: Pause | None = None,
    ) -> Generation:
        """``n`` samples per prompt; rows are prompt-major (samples of a prompt adjacent).

        ``Generation.logprobs`` are log softmax(logits / temperature) of each sampled token
        over the full vocabulary: what the learner computes for the same token.

        ``pause`` (backends with ``inflight_updates`` only): called before every decode
        step; it may load new weights meanwhile, and returns the version the step samples
        with, which ``Generation.versions`` records per token. The sequences in progress
        continue with the new weights (``rollout.inflight_kv``: their KV cache recomputed
        by them, or kept).
        """

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load some of the policy's parameters in place (Hugging Face names, any subset:
        transports call this once per bucket)."""

    def finish_weight_update(self) -> None:
        """Called once every bucket of a new version is loaded (e.g. drop cached prefixes)."""

    @property
    def weight_ranks(self) -> int:
        """Ranks this backend takes in a collective weight-sync group (1: the generator's
        process; a tensor-parallel vLLM engine: one per worker)."""
        return 1

    def join_weight_sync(self, transport: Any, address: Any, rank: int, who: str) -> bool:
        """Join the weight sync inside the engine's own worker processes, each worker as
        ``rank`` + its index, so that each receives its own tensors (``transport``: the
        generator's end, unconnected; ``who``: how errors name it). False (the default):
        the generator's process receives the buckets and calls ``load_weights``."""
        return False

    def receive_weights(self, handle: Any) -> None:
        """Load one bucket in the engine's workers (after ``join_weight_sync`` said True),
        and finish the update after the last one."""
        raise NotImplementedError(f"{type(self).__name__} receives weights in its process")

    def can_share(self, dtype: torch.dtype) -> bool:
        """Whether ``share_weights`` can take tensors of ``dtype`` in CPU memory as they are."""
        return False

    def share_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the policy's parameters these tensors (no copy): the shared-memory transport
        hands a backend views of the segment the learner wrote, so a receiver copies
        nothing. The tensors must stay unchanged until the next ``share_weights``."""
        raise NotImplementedError(f"{type(self).__name__} cannot share weights")

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The policy's parameters by Hugging Face name (for tests; optional)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its parameters")

    def max_context(self) -> int:
        """The longest context (prompt + response tokens) the engine takes (by default: the
        tokenizer's ``model_max_length``, if the backend keeps its tokenizer as ``tok``)."""
        limit = getattr(getattr(self, "tok", None), "model_max_length", None)
        return int(min(limit or 1 << 20, 1 << 20))

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the learner trains (a backend whose
        ``BackendType.sleeps``)."""
        raise NotImplementedError(f"{type(self).__name__} does not sleep")

    def wake_up(self) -> None:
        """Take the memory back before the next weight load and generation."""
        raise NotImplementedError(f"{type(self).__name__} does not sleep")


class HFBackend(GenerationBackend):
    """A transformers model sampled by our own KV-cached loop.

    Nothing but ``SamplingParams`` shapes the distribution: the model's
    ``generation_config`` (repetition penalties, default top-k, ...) is not consulted, so
    the recorded log-probs are those of the policy the learner trains. Only one (N, V)
    row of logits per step is alive at a time: memory grows with the KV cache, not with
    new tokens x vocabulary.

    In-flight updates: a load between two decode steps changes the weights in place (the
    loop is parked meanwhile); with ``inflight_kv: recompute`` the next step runs the whole
    context (prompt and tokens so far) through the new weights into a fresh cache, so every
    later token is sampled exactly as the new version would; ``keep`` goes on with the
    cache the old weights computed (PipelineRL's choice: cheaper, a slightly mixed policy).
    """

    inflight_updates = True

    def __init__(
        self, model_cfg: Any, rollout_cfg: Any, tokenizer: Any, max_prompt_tokens: int = 512
    ):
        dtype = rollout_cfg.dtype or model_cfg.dtype
        self.device = default_device(rollout_cfg.resources.num_gpus, "rollout.resources.num_gpus")
        self._model = (
            load_causal_lm(model_cfg.path, dtype, model_cfg.trust_remote_code)
            .to(self.device)
            .eval()
        )
        self.tok = tokenizer
        self.eos_ids = _eos_ids(self._model, tokenizer)
        self.micro_batch_size = rollout_cfg.micro_batch_size
        self.recompute = rollout_cfg.inflight_kv == "recompute"

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._model.named_parameters()

    def max_context(self) -> int:
        limit = getattr(self._model.config, "max_position_embeddings", None)
        return int(limit) if limit else super().max_context()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self._model.named_parameters())
        for name, src in weights:
            _target(params, name, src).copy_(src)

    def can_share(self, dtype: torch.dtype) -> bool:
        return self.device.type == "cpu" and all(p.dtype == dtype for p in self._model.parameters())

    @torch.no_grad()
    def share_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self._model.named_parameters())
        for name, src in weights:
            if src.dtype != self._model.dtype:
                raise ValueError(f"{name}: {src.dtype} != the model's {self._model.dtype}")
            _target(params, name, src).data = src  # tied parameters are one object: they follow

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        pause: Pause | None = None,
    ) -> Generation:
        rows = [p for p in prompts for _ in range(n)]
        mb = self.micro_batch_size
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return Generation.concat(
            [self._sample(rows[k : k + mb], params, pause) for k in range(0, len(rows), mb)],
            self.tok.pad_token_id,
        )

    @torch.no_grad()
    def _sample(
        self, prompts: list[list[int]], params: SamplingParams, pause: Pause | None = None
    ) -> Generation:
        from transformers import DynamicCache

        pad = self.tok.pad_token_id
        ids, attn = pad_prompts(prompts, pad)
        ids, attn = ids.to(self.device), attn.to(self.device)
        n, steps = ids.shape[0], params.max_new_tokens
        tokens = torch.full((n, steps), pad, dtype=torch.long)
        logprobs = torch.zeros((n, steps), dtype=torch.float32)
        versions = None if pause is None else torch.full((n, steps), -1, dtype=torch.long)
        lengths = torch.zeros(n, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        pos = position_ids(attn)
        cache, inputs, version = DynamicCache(), ids, None
        for t in range(steps):
            if pause is not None:
                held = pause()  # a new version may be loaded meanwhile
                if self.recompute and version is not None and held != version:
                    cache, pos = DynamicCache(), position_ids(attn)  # the whole context again
                    inputs = torch.cat([ids, tokens[:, :t].to(self.device)], dim=1)
                version = held
                versions[:, t] = torch.where(done.cpu(), -1, version)
            out = self._model(
                input_ids=inputs,
                attention_mask=attn,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            tok, lp = sample_step(out.logits[:, -1, :], params)
            del out
            tok = tok.masked_fill(done, pad)
            lengths += (~done).long().cpu()
            tokens[:, t] = tok.cpu()
            logprobs[:, t] = lp.masked_fill(done, 0.0).float().cpu()
            if not params.ignore_eos:
                done |= torch.isin(tok, eos)
            if params.stop:
                done |= self._stopped(tokens[:, : t + 1], done, params.stop).to(self.device)
            if bool(done.all()):
                break
            inputs = tok[:, None]
            attn = torch.cat([attn, attn.new_ones(n, 1)], dim=1)
            pos = pos[:, -1:] + 1
        width = int(lengths.max()) if n else 0
        cut = None if versions is None else versions[:, :width]
        return Generation(tokens[:, :width], lengths, logprobs[:, :width], (~done).cpu(), cut)

    def _stopped(self, tokens: torch.Tensor, done: torch.Tensor, stop: tuple[str, ...]):
        """(N,) whether a running row's text now holds a stop string. Only the last tokens
        are decoded (enough for the longest stop string): an earlier match would have
        stopped the row at an earlier step."""
        window = max(len(s) for s in stop) + 4
        out = torch.zeros(len(tokens), dtype=torch.bool)
        for i in (~done).cpu().nonzero().flatten().tolist():
            text = self.tok.decode(tokens[i, -window:], skip_special_tokens=True)
            out[i] = any(s in text for s in stop)
        return out


def cut_at_stop(text: str, stop: Sequence[str], include: bool = False) -> str:
    """``text`` cut before the stop string that ends first in it (or after it with
    ``include``), as vLLM cuts its output text; unchanged without a match."""
    best: tuple[int, int] | None = None  # (end, start) of the match that ends first
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best[0]):
            best = (i + len(s), i)
    if best is None:
        return text
    return text[: best[0]] if include else text[: best[1]]


def sample_step(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from (N, V) logits: ``(tokens, log-probs)``.

    The log-prob is that of the distribution sampled from: log softmax(logits / T) with
    top-k / top-p applied (renormalised over the kept tokens), as vLLM's
    ``processed_logprobs``. With top_p=1 and top_k=0 (the defaults) that is exactly the
    learner's log softmax(logits / T); with truncation it is larger than the learner's
    value, and ``train/logprob_mismatch`` shows the gap. Greedy (T=0) records T=1 log-probs.
    """
    logits = logits.float()
    if params.temperature == 0:
        tok = logits.argmax(dim=-1)
        return tok, torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None])[:, 0]
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    scores = truncate(scores, params.top_k, params.top_p)
    logp = torch.log_softmax(scores, dim=-1)
    tok = torch.multinomial(logp.exp(), 1)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def truncate(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set scores outside the top-k and the top-p nucleus to -inf (the first token is
    always kept)."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_scores, dim=-1)) >= top_p  # mass before it
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _target(params: dict[str, torch.Tensor], name: str, src: torch.Tensor) -> torch.Tensor:
    dst = params.get(name)
    if dst is None:
        raise ValueError(f"weight {name!r} is not a parameter of the generator's model")
    if dst.shape != src.shape:
        raise ValueError(f"{name}: shape {tuple(src.shape)} != model's {tuple(dst.shape)}")
    return dst


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def backend_class(name: str) -> type[GenerationBackend]:
    """The backend ``rollout.backend`` names (``rollout/backends.py``; a backend's module,
    e.g. vLLM's, is imported only when asked for)."""
    from rlalign_ray.rollout.backends import backend_type

    return backend_type(name).load()
