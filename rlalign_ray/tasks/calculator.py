"""Multi-step sums solved with a calculator tool: the multi-turn demo's task.

A problem is ``{"prompt": "12+34+56=", "answer": "102"}``. With the built-in
``CalculatorEnv`` the model may call the tool: ``<12+34>`` is answered ``=46 ``, then
``<46+56>`` is answered ``=102 ``, and the action ``102`` (ending with EOS) is the final
answer. A tiny model cannot add three numbers in its head, but it can copy digits, so the
reward (a right final answer) rewards calling the tool.

``warmup_sft`` teaches the interaction format on demonstrations: a share ``p_tool`` of them
call the tool twice, the others answer directly, and the first action token is labelled so
that the tool is chosen in a share ``p_first`` of them. The warmed-up model calls the tool in
about ``p_first`` of its samples and answers directly (mostly wrong) when greedy: RL has to
find out that the tool pays.
"""

from __future__ import annotations

import random
from typing import Any

from rlalign_ray.tasks.arithmetic import write_jsonl

DEFAULT_SEED = 4321
TRAIN_FILE, EVAL_FILE = "calc_train.jsonl", "calc_eval.jsonl"
CALL_OPEN, CALL_CLOSE = "<", ">"


def make_split(
    n_train: int = 2000, n_eval: int = 128, seed: int = DEFAULT_SEED, lo: int = 10, hi: int = 99
) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, eval) lists of ``a+b+c=`` problems with operands in ``[lo, hi]``.

    >>> make_split(2, 1, lo=1, hi=3)[1]
    [{'prompt': '3+3+1=', 'answer': '7'}]
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        a, b, c = (rng.randint(lo, hi) for _ in range(3))
        prompt = f"{a}+{b}+{c}="
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": str(a + b + c)})
    return rows[n_eval:], rows[:n_eval]


def write_datasets(dir: str) -> dict[str, str]:
    """``calc_train.jsonl`` and ``calc_eval.jsonl`` (the defaults reproduce
    ``configs/data/``)."""
    import os

    train, evals = make_split()
    paths = {"train": os.path.join(dir, TRAIN_FILE), "eval": os.path.join(dir, EVAL_FILE)}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], evals)
    return paths


def demonstration(problem: dict, use_tool: bool) -> list[tuple[str, bool]]:
    """The turns of a solved episode after the prompt: ``(text, is_action)`` pairs; the
    final action is followed by EOS.

    >>> demonstration({"prompt": "12+34+56=", "answer": "102"}, True)
    [('<12+34>', True), ('=46 ', False), ('<46+56>', True), ('=102 ', False), ('102', True)]
    """
    if not use_tool:
        return [(problem["answer"], True)]
    a, b, c = problem["prompt"].rstrip("=").split("+")
    ab = str(int(a) + int(b))
    return [
        (f"{CALL_OPEN}{a}+{b}{CALL_CLOSE}", True),
        (f"={ab} ", False),
        (f"{CALL_OPEN}{ab}+{c}{CALL_CLOSE}", True),
        (f"={problem['answer']} ", False),
        (problem["answer"], True),
    ]


def _sft_batch(tok: Any, problems: list[dict], tools: list[bool], firsts: list[bool]):
    """Right-padded ``<s> prompt turns </s>`` batch with labels on the action tokens (and
    the final EOS) only; every piece is tokenised on its own, as rollouts do. Where
    ``firsts`` is False the first action token (the choice: tool or answer) has no label."""
    import torch

    seqs, labels = [], []
    for p, use_tool, first in zip(problems, tools, firsts):
        ids = tok(p["prompt"])["input_ids"]
        lab = [-100] * len(ids)
        start = len(ids)
        for text, is_action in demonstration(p, use_tool):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            lab += piece if is_action else [-100] * len(piece)
        if not first:
            lab[start] = -100
        ids.append(tok.eos_token_id)
        lab.append(tok.eos_token_id)
        seqs.append(ids)
        labels.append(lab)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    lab_t = torch.full_like(input_ids, -100)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        lab_t[i, : len(s)] = torch.tensor(lab)
    return input_ids, attn, lab_t


def warmup_sft(
    model: Any,
    tok: Any,
    problems: list[dict],
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 64,
    p_tool: float = 0.25,
    seed: int = 0,
    p_first: float | None = None,
) -> dict:
    """Supervised warm-up on demonstrations (``p_tool`` of them with tool calls): AdamW,
    linear warm-up then cosine decay; returns ``{"steps", "final_loss", "seconds"}``.

    ``p_first``: the share of tool calls among the labelled first action tokens (default
    ``p_tool``). With ``p_tool`` high and ``p_first`` low, the model learns to use the tool
    well from many demonstrations but chooses it rarely: some tool demonstrations leave
    their first token unlabelled."""
    import math
    import time

    import torch

    t0, losses = time.time(), []
    q = p_tool if p_first is None else p_first
    keep = 1.0 if p_tool in (0.0, 1.0) else min(1.0, q * (1 - p_tool) / (p_tool * (1 - q)))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    model.train()
    for step in range(steps):
        batch = [problems[rng.randrange(len(problems))] for _ in range(batch_size)]
        tools = [rng.random() < p_tool for _ in batch]
        firsts = [not t or rng.random() < keep for t in tools]
        ids, attn, labels = _sft_batch(tok, batch, tools, firsts)
        frac = (
            (step + 1) / warm
            if step < warm
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        )
        for g in opt.param_groups:
            g["lr"] = lr * min(frac, 1.0)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "final_loss": sum(tail) / len(tail), "seconds": time.time() - t0}
