"""Built-in verifiable reward functions.

Convention (TRL's): called with keyword arguments ``prompts``, ``completions``,
``completion_ids``, ``trainer_state`` and one per dataset column (a list per key, one value
per completion); one float (or None: not applicable) is returned per completion.
Conversational completions are ``[{"role": "assistant", "content": text}]``.
"""

from __future__ import annotations

from typing import Sequence

# Texts that end a completion when special tokens were not skipped at decode time.
EOS_TEXTS = ("</s>", "<pad>", "<|endoftext|>", "<|im_end|>", "<eos>")


def extract_first_token(completion: str, eos_texts: Sequence[str] = EOS_TEXTS) -> str:
    """Text of ``completion`` before any EOS text, stripped, up to the first whitespace.

    >>> extract_first_token("  68</s><pad>")
    '68'
    >>> extract_first_token("68\\n12+3=15")
    '68'
    >>> extract_first_token("   ")
    ''
    """
    text = completion
    for eos in eos_texts:
        idx = text.find(eos)
        if idx != -1:
            text = text[:idx]
    parts = text.strip().split(maxsplit=1)
    return parts[0] if parts else ""


def completion_text(completion) -> str:
    """The text of a completion, plain or conversational (``[{"role": ..., "content": ...}]``)."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return completion


def arithmetic_exact(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion's first answer token equals ``answer`` exactly, else 0.0.

    The completion is cut at the first EOS/pad text (``</s>``, ``<pad>`` ...), stripped, and
    cut at the first whitespace/newline; the remainder must equal
    ``str(answer).strip()``.

    >>> arithmetic_exact(
    ...     prompts=["2+3=", "2+3=", "2+3=", "2+3=", "9+9="],
    ...     completions=["5</s>", " 5\\nmore", "55", "6", "18"],
    ...     answer=["5", "5", "5", "5", 18],
    ... )
    [1.0, 1.0, 0.0, 0.0, 1.0]
    >>> arithmetic_exact(completions=[[{"role": "assistant", "content": "7"}]], answer=["7"])
    [1.0]
    """
    if isinstance(answer, (str, int)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    return [
        1.0 if extract_first_token(completion_text(c)) == str(a).strip() else 0.0
        for c, a in zip(completions, answer)
    ]
