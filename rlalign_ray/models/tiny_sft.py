"""Supervised warm-up of a tiny model on ``prompt + answer + eos`` (plain torch,
in-process): AdamW, linear warm-up then cosine decay, optional early stop on a measured
greedy accuracy."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlalign_ray.models.tiny_eval import _fork_rng, _load, _num_threads, greedy_accuracy

logger = logging.getLogger(__name__)


def _encode_sft_batch(tokenizer, problems: Sequence[dict]):
    """Right-padded ``<s> prompt answer </s>`` batch, labels only on answer+eos."""
    import torch

    seqs, labels = [], []
    for p in problems:
        prompt_ids = tokenizer(p["prompt"])["input_ids"]  # includes <s>
        ans_ids = tokenizer(str(p["answer"]), add_special_tokens=False)["input_ids"]
        ans_ids = ans_ids + [tokenizer.eos_token_id]
        seqs.append(prompt_ids + ans_ids)
        labels.append([-100] * len(prompt_ids) + ans_ids)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lbl) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        lab[i, : len(lbl)] = torch.tensor(lbl)
    return input_ids, attn, lab


def warmup_sft(
    model_dir: str,
    problems: Sequence[dict],
    steps: int = 400,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.05,
    num_threads: int | None = None,
    eval_problems: Sequence[dict] | None = None,
    eval_every: int = 0,
    target_accuracy: float | None = None,
    target_problems: Sequence[dict] | None = None,
    save: bool = True,
    model=None,
    tokenizer=None,
) -> dict:
    """Supervised warm-up on ``prompt + answer + eos`` (loss on answer+eos only).

    Plain torch, in-process: AdamW, linear warm-up then cosine decay to 10% of
    ``lr``, batches drawn with a seeded generator.  The result is saved back
    into ``model_dir`` (unless ``save=False``).  Returns metrics:
    ``{"steps", "final_loss", "seconds", ...}`` plus ``greedy_accuracy`` when
    ``eval_problems`` is given (and ``history``, a list of
    ``(step, loss, greedy_accuracy)``, when ``eval_every > 0``).

    Early stop: with ``target_accuracy`` set, greedy accuracy on
    ``target_problems`` (default: the first 128 training problems, so the
    held-out set is never looked at) is checked every ``eval_every`` (default
    10) steps and training stops once it reaches the target; ``steps`` is then
    the cap (and the length of the lr schedule).  Arithmetic warm-up has a
    sharp phase transition, so stopping on a measured accuracy lands the
    model in the partially-competent band far more reliably than a fixed
    step count (which would be sensitive to kernel-level numeric noise).
    """
    if model is None or tokenizer is None:
        model, tokenizer = _load(model_dir, tokenizer)
    if not problems:
        raise ValueError("warmup_sft needs at least one problem")
    t0 = time.time()
    run = _Warmup(model, tokenizer, problems, steps, lr, batch_size)
    run.plan_evals(eval_every, eval_problems, target_accuracy, target_problems)
    with _num_threads(num_threads), _fork_rng(seed):
        run.train(seed, weight_decay, warmup_frac)
    metrics = run.metrics(seconds=time.time() - t0)
    if save:
        model.save_pretrained(model_dir, safe_serialization=True)
    if eval_problems:
        with _num_threads(num_threads):
            metrics["greedy_accuracy"] = greedy_accuracy(model, tokenizer, eval_problems)
        if run.history:
            metrics["history"] = run.history
    logger.info("warm-up SFT: %s", json.dumps(metrics))
    return metrics


def _lr_at(step: int, steps: int, n_warm: int, lr: float) -> float:
    """Linear warm-up over ``n_warm`` steps, then cosine decay to 10% of ``lr``."""
    if step < n_warm:
        return lr * (step + 1) / n_warm
    prog = (step - n_warm) / max(1, steps - n_warm)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * prog)))


@dataclass
class _Warmup:
    """One warm-up run: the training loop, its periodic evaluations and its metrics."""

    model: Any
    tokenizer: Any
    problems: Sequence[dict]
    steps: int
    lr: float
    batch_size: int
    eval_every: int = 0
    eval_problems: Sequence[dict] | None = None
    record_history: bool = False
    target_accuracy: float | None = None
    target_problems: Sequence[dict] | None = None
    losses: list[float] = field(default_factory=list)
    history: list[tuple[int, float, float]] = field(default_factory=list)
    eval_time: float = 0.0
    stopped_at: int = 0
    target_acc: float | None = None

    def plan_evals(self, eval_every, eval_problems, target_accuracy, target_problems) -> None:
        """History only when asked for explicitly; a target is checked every 10 steps
        unless told otherwise, on the first 128 training problems unless given others."""
        self.eval_problems = eval_problems
        self.record_history = bool(eval_every and eval_problems)
        if target_accuracy is not None:
            target_problems = list(target_problems or self.problems[:128])
            eval_every = eval_every or 10
        self.eval_every = eval_every
        self.target_accuracy, self.target_problems = target_accuracy, target_problems

    def train(self, seed: int, weight_decay: float, warmup_frac: float) -> None:
        import torch

        self.stopped_at = self.steps
        gen = torch.Generator().manual_seed(seed)
        self.model.train()
        opt = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, betas=(0.9, 0.98), weight_decay=weight_decay
        )
        n_warm = max(1, int(self.steps * warmup_frac))
        for step in range(self.steps):
            idx = torch.randint(len(self.problems), (self.batch_size,), generator=gen).tolist()
            batch = [self.problems[i] for i in idx]
            self._step(opt, batch, _lr_at(step, self.steps, n_warm, self.lr))
            done = step + 1
            if self.eval_every and done % self.eval_every == 0 and done < self.steps:
                if self._evaluate(done):
                    self.stopped_at = done
                    break
        self.model.eval()

    def _step(self, opt, batch: list[dict], lr: float) -> None:
        import torch

        input_ids, attn, labels = _encode_sft_batch(self.tokenizer, batch)
        for g in opt.param_groups:
            g["lr"] = lr
        out = self.model(input_ids=input_ids, attention_mask=attn, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        opt.step()
        self.losses.append(out.loss.item())

    def _evaluate(self, step: int) -> bool:
        """Measure after ``step`` steps; True once the target accuracy is reached."""
        te = time.time()
        if self.target_accuracy is not None:
            self.target_acc = greedy_accuracy(self.model, self.tokenizer, self.target_problems)
        if self.record_history:
            acc = greedy_accuracy(self.model, self.tokenizer, self.eval_problems)
            recent = self.losses[-10:]
            self.history.append((step, sum(recent) / len(recent), acc))
        self.model.train()
        self.eval_time += time.time() - te
        return self.target_acc is not None and self.target_acc >= self.target_accuracy

    def metrics(self, seconds: float) -> dict:
        losses = self.losses
        tail = losses[-20:] if losses else [float("nan")]
        metrics = {
            "steps": self.stopped_at,
            "max_steps": self.steps,
            "first_loss": losses[0] if losses else float("nan"),
            "final_loss": sum(tail) / len(tail),
            "seconds": seconds,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "eval_seconds": self.eval_time,
        }
        if self.target_accuracy is not None:
            reached = self.target_acc is not None and self.target_acc >= self.target_accuracy
            metrics["target_accuracy"] = self.target_accuracy
            metrics["target_reached"] = bool(reached)
            metrics["train_subset_accuracy"] = self.target_acc
        return metrics
