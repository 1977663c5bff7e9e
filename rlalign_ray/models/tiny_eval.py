"""Generation and exact-match accuracy for the tiny models (real ``generate`` on
left-padded batches), and the torch contexts building and warm-up share: a forked,
seeded RNG and a thread count."""

from __future__ import annotations

import contextlib
import os
from typing import Sequence


@contextlib.contextmanager
def _fork_rng(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _num_threads(n: int | None):
    import torch

    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _load(model_dir_or_model, tokenizer=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir_or_model))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir_or_model))
    else:
        model = model_dir_or_model
    if tokenizer is None:
        raise ValueError("tokenizer is required when passing a model object")
    return model, tokenizer


def generate_completions(
    model_dir_or_model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 6,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 128,
    seed: int = 0,
) -> list[str]:
    """Generate with ``model.generate`` on left-padded batches; returns decoded new text.

    Output order: for each prompt, ``num_return_sequences`` completions in a row.
    Special tokens are skipped in the decoded text.
    """
    import torch

    model, tokenizer = _load(model_dir_or_model, tokenizer)
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        with torch.no_grad(), _fork_rng(seed):
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i : i + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                kwargs = dict(
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    num_return_sequences=num_return_sequences,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                if do_sample:
                    kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
                gen = model.generate(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return outs


def _accuracy(completions: Sequence[str], answers: Sequence[str]) -> float:
    from rlalign_ray.rewards.builtin import arithmetic_exact

    if not completions:
        return 0.0
    rewards = arithmetic_exact(completions=list(completions), answer=list(answers))
    return sum(rewards) / len(rewards)


def greedy_accuracy(
    model_dir_or_model, tokenizer, problems: Sequence[dict], max_new_tokens: int = 6
) -> float:
    """Exact-match accuracy of greedy ``generate`` on ``problems``.

    A completion counts only if the digits are followed by ``</s>`` (or the
    token budget ends right after them): special tokens are stripped before
    scoring, so trailing junk digits make it wrong.
    """
    comps = generate_completions(
        model_dir_or_model, tokenizer, [p["prompt"] for p in problems], max_new_tokens
    )
    return _accuracy(comps, [p["answer"] for p in problems])


def sampled_accuracy(
    model_dir_or_model,
    tokenizer,
    problems: Sequence[dict],
    n: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 6,
    seed: int = 0,
) -> float:
    """Mean exact-match reward of ``n`` samples per prompt at ``temperature``."""
    comps = generate_completions(
        model_dir_or_model,
        tokenizer,
        [p["prompt"] for p in problems],
        max_new_tokens,
        do_sample=True,
        temperature=temperature,
        num_return_sequences=n,
        seed=seed,
    )
    answers = [p["answer"] for p in problems for _ in range(n)]
    return _accuracy(comps, answers)
