"""Reward functions used by the tests (imported by reward actors by module path)."""

from __future__ import annotations

import os


def digit_fraction(prompts, completions, **columns):
    """Share of digit characters: varies between samples, so GRPO has signal."""
    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]


def raises(prompts, completions, **columns):
    raise ValueError("bad reward input")


def wrong_length(prompts, completions, **columns):
    return [1.0]


def dies(prompts, completions, **columns):
    os._exit(1)


def uses_answer(prompts, completions, answer, **columns):
    return [float(a in c) for c, a in zip(completions, answer)]


def nan_on_first(prompts, completions, **columns):
    """NaN for the first completion of every batch, else the digit fraction."""
    values = digit_fraction(prompts, completions)
    values[0] = float("nan")
    return values


def returns_nan(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def returns_strings(prompts, completions, **columns):
    return ["good"] * len(completions)


def hangs(prompts, completions, **columns):
    import time

    time.sleep(600)
    return [0.0] * len(completions)


_CALLS = {"n": 0}


def nan_once(prompts, completions, **columns):
    """NaN for the first completion of this process's first batch, then the digit fraction."""
    values = digit_fraction(prompts, completions)
    _CALLS["n"] += 1
    if _CALLS["n"] == 1:
        values[0] = float("nan")
    return values


def completions_only(completions):
    return [0.0] * len(completions)


NOT_CALLABLE = [1.0, 2.0]


def odd_answers_only(completions, answer, **kwargs):
    """Applies to prompts with an odd answer only (None elsewhere, as TRL's multi-task
    rewards do): 1.0 when the completion contains the answer."""
    return [(float(str(a) in c) if int(a) % 2 else None) for c, a in zip(completions, answer)]


def never_applies(completions, **kwargs):
    return [None] * len(completions)


def sees_everything(prompts, completions, completion_ids, trainer_state, **columns):
    """Checks what TRL passes: keyword arguments, token ids per completion, the step."""
    assert len(prompts) == len(completions) == len(completion_ids)
    assert all(isinstance(ids, list) for ids in completion_ids)
    assert isinstance(trainer_state.global_step, int)
    return [float(trainer_state.global_step)] * len(completions)
