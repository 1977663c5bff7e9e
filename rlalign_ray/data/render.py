"""Prompts as the policy sees them: chat rendering, exactly one BOS, length limits.

``PromptRenderer`` is shared by the generator (which encodes every prompt it samples) and
the driver (``prepare_prompts``: before any actor starts, every dataset prompt is rendered
and measured once, so that ``data.truncation: error`` names the offending ``file:line`` and
``drop`` can leave prompts out of the dataset).
"""

from __future__ import annotations

import logging
from typing import Any

from rlalign_ray.data.items import PromptItem
from rlalign_ray.errors import DataError

TRUNCATION_MODES = ("error", "left", "drop")
log = logging.getLogger(__name__)


class PromptRenderer:
    """Render a dataset prompt to text and encode it with exactly one BOS.

    A prompt that is a list of ``{role, content}`` messages (or any prompt when
    ``chat_template`` is on) goes through the tokenizer's chat template with
    ``add_generation_prompt=True`` and ``chat_template_kwargs`` (e.g.
    ``enable_thinking: false``). Encoding never lets the tokenizer add special tokens on
    top of a rendered template: it prepends the BOS token only when the tokenizer uses one
    (it adds it to plain text) and the text does not already begin with it. A
    ``system_prompt`` goes first in every chat-rendered prompt without a system message
    of its own (``first=False``: an environment's later observations, never).
    """

    def __init__(
        self,
        tok: Any,
        chat_template: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_tokens: int = 0,
        system_prompt: str = "",
    ):
        self.tok = tok
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.kwargs = dict(chat_template_kwargs or {})
        self.max_tokens = max_tokens
        self.bos_id = uses_bos(tok)

    def render(self, prompt: Any, first: bool = True) -> str:
        if isinstance(prompt, list) or self.chat_template:
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if first and self.system_prompt and not (msgs and msgs[0].get("role") == "system"):
                msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
            if getattr(self.tok, "chat_template", None) is None:
                raise ValueError(
                    "the prompt is a list of messages (or model.chat_template is on) "
                    "but the tokenizer has no chat template"
                )
            return self.tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True, **self.kwargs
            )
        return prompt

    def encode_full(self, text: str) -> list[int]:
        """All of ``text``'s tokens, with exactly one leading BOS when the tokenizer uses one."""
        return encode_one_bos(self.tok, text, self.bos_id)

    def left_truncate(self, ids: list[int]) -> list[int]:
        """The last ``max_tokens`` tokens, keeping a leading BOS in front."""
        m = self.max_tokens
        if not m or len(ids) <= m:
            return ids
        if self.bos_id is not None and ids and ids[0] == self.bos_id and m > 1:
            return [ids[0]] + ids[len(ids) - m + 1 :]
        return ids[len(ids) - m :]

    def encode(self, text: str) -> list[int]:
        return self.left_truncate(self.encode_full(text))


def uses_bos(tok: Any) -> int | None:
    """The BOS id when the tokenizer puts it in front of plain text, else None."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return None
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def encode_one_bos(tok: Any, text: str, bos_id: int | None) -> list[int]:
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if bos_id is not None:
        if not ids or ids[0] != bos_id:
            ids = [bos_id] + ids
        while len(ids) > 1 and ids[1] == bos_id:  # a template that wrote BOS twice
            ids.pop(1)
    return ids


def prepare_prompts(
    items: list[PromptItem],
    renderer: PromptRenderer,
    mode: str,
    key: str = "data.train",
) -> tuple[list[PromptItem], dict[str, float]]:
    """Measure every prompt once; apply ``data.truncation`` (``mode``) to the long ones.

    ``error``: a ``DataError`` naming the first long prompt's ``file:line``, its length and
    the fixes; ``left``: kept (the generator keeps its last tokens) and counted in
    ``data/truncated``; ``drop``: left out and counted in ``data/dropped``. Returns the
    prompts kept and the counts.
    """
    if mode not in TRUNCATION_MODES:
        raise DataError(f"data.truncation: use one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    limit = renderer.max_tokens
    if not limit:
        return items, {}
    kept: list[PromptItem] = []
    long = 0
    for it in items:
        try:
            n = len(renderer.encode_full(renderer.render(it.prompt)))
        except ValueError as e:
            raise DataError(f"{key}: {it.source or f'row {it.index}'}: {e}") from None
        if n <= limit:
            kept.append(it)
            continue
        long += 1
        if mode == "error":
            raise DataError(
                f"{key}: {it.source or f'row {it.index}'}: the prompt is {n} tokens, longer "
                f"than data.max_prompt_tokens = {limit}; shorten it, raise "
                "data.max_prompt_tokens, or set data.truncation: left (keep the last tokens) "
                "or drop (leave such prompts out)"
            )
        if mode == "left":
            kept.append(it)
    if mode == "drop" and not kept:
        raise DataError(
            f"{key}: every prompt is longer than data.max_prompt_tokens = {limit}, so "
            "data.truncation: drop leaves none; raise data.max_prompt_tokens"
        )
    name = "data/truncated" if mode == "left" else "data/dropped"
    if long:
        log.warning(
            "%s: %d of %d prompts longer than %d tokens (%s)",
            key,
            long,
            len(items),
            limit,
            "left-truncated" if mode == "left" else "dropped",
        )
    return kept, ({name: float(long)} if mode != "error" else {})
