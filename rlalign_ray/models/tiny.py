"""Tiny, locally built causal LMs for demos and tests (no model hub needed).

* :func:`build_tokenizer` - character-level tokenizer (``tokenizers`` WordLevel
  over single characters) wrapped in ``PreTrainedTokenizerFast``.
* :func:`build_tiny_model` - randomly initialised Llama/Qwen2 of ~0.6M params.
* :func:`warmup_sft` - short in-process supervised pass on ``prompt+answer+eos``.
* :func:`greedy_accuracy` / :func:`sampled_accuracy` - exact-match accuracy with
  the real ``generate`` (left-padded batches).
* :func:`make_tiny_model` - everything above in one call (CLI entry point).

transformers 5.x note (verified with 5.24): ``AutoTokenizer.from_pretrained``
on a folder whose ``config.json`` has ``model_type="qwen2"`` does not
faithfully reload our saved character tokenizer: it is re-created through the
Qwen2 tokenizer class (byte-level BPE conventions), and spaces are lost on
``decode(encode(" 1 + 2 = 3"))``.  For ``model_type="llama"`` the saved
``tokenizer.json`` is loaded as-is and round-trips exactly.  Hence ``llama`` is
the default architecture; ``qwen2`` is kept to exercise that model class.
Workaround for qwen2 folders: ``PreTrainedTokenizerFast.from_pretrained(dir)``
(or ``TokenizersBackend.from_pretrained``) loads the saved tokenizer exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import string
import time
from typing import Sequence

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3
DEFAULT_ALPHABET = (
    string.digits + "+-*/=()<>.,:;?!'\"_ \n" + string.ascii_lowercase + string.ascii_uppercase
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MODEL_MAX_LENGTH = 256

# Default tiny recipe (see make_tiny_model / rlalign_ray.models.builtin).
# ~0.77M params; warm-up = AdamW lr 2e-3, batch 64, cosine over <= 400 steps, early
# stop once greedy accuracy on 128 training problems reaches 0.35 (~190 steps,
# ~20 s on one thread).  See warmup_sft for why a target is used.
DEFAULT_MODEL_KWARGS = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=320)
DEFAULT_WARMUP_KWARGS = dict(steps=400, lr=2e-3, batch_size=64, seed=0, target_accuracy=0.35)


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(
    out_dir: str | None = None, alphabet: str = DEFAULT_ALPHABET, vocab_size: int = 0
):
    """Build a character-level tokenizer; save it to ``out_dir`` if given and return it.

    Every character of ``alphabet`` is one token (unknown characters map to
    ``<unk>``); ids 0-3 are ``<pad> <s> </s> <unk>``.  Encoding adds ``<s>`` at
    the start and no ``</s>``.  ``padding_side`` defaults to ``"left"`` and a
    plain-text ``chat_template`` (``role: content`` lines) is attached.

    >>> import tempfile
    >>> from transformers import AutoTokenizer
    >>> d = tempfile.mkdtemp(); _ = build_tokenizer(d)
    >>> tok = AutoTokenizer.from_pretrained(d)
    >>> tok.decode(tok(" 1 + 2 = 3")["input_ids"], skip_special_tokens=True)
    ' 1 + 2 = 3'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars: list[str] = []
    for ch in alphabet:
        if ch not in chars:
            chars.append(ch)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    # Filler tokens up to ``vocab_size`` (benchmarks need a real-sized vocabulary); each
    # decodes to a visible string, none is produced by encoding characters.
    while len(vocab) < vocab_size:
        vocab[f"<x{len(vocab)}>"] = len(vocab)

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # one pre-token per character, newline included
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()  # concatenate tokens without inserting spaces
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tk.add_special_tokens(SPECIAL_TOKENS)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok


# --------------------------------------------------------------------------- model
def build_tiny_model(
    out_dir: str,
    arch: str = "llama",
    hidden_size: int = DEFAULT_MODEL_KWARGS["hidden_size"],
    num_layers: int = DEFAULT_MODEL_KWARGS["num_layers"],
    num_heads: int = DEFAULT_MODEL_KWARGS["num_heads"],
    intermediate_size: int = DEFAULT_MODEL_KWARGS["intermediate_size"],
    seed: int = 0,
    tokenizer=None,
    max_position_embeddings: int = MODEL_MAX_LENGTH,
):
    """Randomly initialise a tiny ``arch`` ("llama" or "qwen2") causal LM and save it.

    Saves model (safetensors), tokenizer and generation config into
    ``out_dir`` with ``save_pretrained``; returns ``(model, tokenizer)``.
    Embeddings are tied; bos/eos/pad ids come from the tokenizer.

    Prefer ``arch="llama"``: with transformers 5.x, ``AutoTokenizer`` reloads a
    folder whose config says ``qwen2`` through the Qwen2 tokenizer class, which
    does not preserve our character tokenizer (spaces are lost); llama folders
    load ``tokenizer.json`` unchanged.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if tokenizer is None:
        tokenizer = build_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'qwen2'")

    with _fork_rng(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def build_sized_model(out_dir: str, hidden: int, layers: int, vocab: int, seed: int = 0) -> str:
    """A random-init Llama of a chosen size (benchmarks), with a character tokenizer padded
    to ``vocab`` tokens; built once into ``out_dir`` (under a file lock), then reused."""
    from filelock import FileLock

    os.makedirs(os.path.dirname(os.path.abspath(out_dir)) or ".", exist_ok=True)
    with FileLock(out_dir.rstrip("/") + ".lock"):
        if os.path.isfile(os.path.join(out_dir, "config.json")):
            return out_dir
        tmp = out_dir.rstrip("/") + ".tmp"
        heads = max(1, hidden // 64)
        build_tiny_model(
            tmp,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
            seed=seed,
            tokenizer=build_tokenizer(vocab_size=vocab),
            max_position_embeddings=4096,
        )
        os.replace(tmp, out_dir)
    return out_dir


def num_parameters(model) -> int:
    """Unique parameter count (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


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


# --------------------------------------------------------------------------- SFT
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
    import torch

    if model is None or tokenizer is None:
        model, tokenizer = _load(model_dir, tokenizer)
    if not problems:
        raise ValueError("warmup_sft needs at least one problem")
    t0 = time.time()
    losses: list[float] = []
    history: list[tuple[int, float, float]] = []
    eval_time = 0.0
    record_history = bool(eval_every and eval_problems)  # only when asked for explicitly
    if target_accuracy is not None:
        target_problems = list(target_problems or problems[:128])
        eval_every = eval_every or 10
    stopped_at = steps
    target_acc = None
    with _num_threads(num_threads), _fork_rng(seed):
        gen = torch.Generator().manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay
        )
        n_warm = max(1, int(steps * warmup_frac))

        def lr_at(step: int) -> float:
            if step < n_warm:
                return lr * (step + 1) / n_warm
            prog = (step - n_warm) / max(1, steps - n_warm)
            return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * prog)))

        for step in range(steps):
            idx = torch.randint(len(problems), (batch_size,), generator=gen).tolist()
            input_ids, attn, labels = _encode_sft_batch(tokenizer, [problems[i] for i in idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = model(input_ids=input_ids, attention_mask=attn, labels=labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(out.loss.item())
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                te = time.time()
                if target_accuracy is not None:
                    target_acc = greedy_accuracy(model, tokenizer, target_problems)
                if record_history:
                    acc = greedy_accuracy(model, tokenizer, eval_problems)
                    history.append((step + 1, sum(losses[-10:]) / len(losses[-10:]), acc))
                model.train()
                eval_time += time.time() - te
                if target_acc is not None and target_acc >= target_accuracy:
                    stopped_at = step + 1
                    break
        model.eval()
    seconds = time.time() - t0
    tail = losses[-20:] if losses else [float("nan")]
    metrics = {
        "steps": stopped_at,
        "max_steps": steps,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(tail) / len(tail),
        "seconds": seconds,
        "lr": lr,
        "batch_size": batch_size,
        "eval_seconds": eval_time,
    }
    if target_accuracy is not None:
        metrics["target_accuracy"] = target_accuracy
        metrics["target_reached"] = bool(target_acc is not None and target_acc >= target_accuracy)
        metrics["train_subset_accuracy"] = target_acc
    if save:
        model.save_pretrained(model_dir, safe_serialization=True)
    if eval_problems:
        with _num_threads(num_threads):
            metrics["greedy_accuracy"] = greedy_accuracy(model, tokenizer, eval_problems)
        if history:
            metrics["history"] = history
    logger.info("warm-up SFT: %s", json.dumps(metrics))
    return metrics


# --------------------------------------------------------------------------- eval
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


# --------------------------------------------------------------------------- one-shot
def make_tiny_model(
    out_dir: str,
    arch: str = "llama",
    warmup_task: str | None = None,
    model_kwargs: dict | None = None,
    warmup_kwargs: dict | None = None,
    seed: int = 0,
    num_threads: int | None = None,
) -> dict:
    """Build tokenizer + tiny model into ``out_dir``; optionally warm it up on a task.

    ``warmup_task``: ``None`` (random init) or ``"arith"`` (supervised warm-up on
    the default arithmetic train split, then greedy accuracy on the eval
    split).  Returns a summary dict (path, arch, params, warm-up metrics).
    Backs ``rlalign-ray make-tiny-model DIR [--arch llama|qwen2] [--warmup arith]``.
    """
    mk = {**DEFAULT_MODEL_KWARGS, **(model_kwargs or {})}
    t0 = time.time()
    model, tok = build_tiny_model(out_dir, arch=arch, seed=seed, **mk)
    summary: dict = {"path": out_dir, "arch": arch, "params": num_parameters(model), **mk}
    if warmup_task is not None:
        if warmup_task not in ("arith", "arithmetic"):
            raise ValueError(f"unknown warmup task {warmup_task!r}; known: 'arith'")
        from rlalign_ray.tasks.arithmetic import train_eval_split

        train, evals = train_eval_split()
        wk = {**DEFAULT_WARMUP_KWARGS, **(warmup_kwargs or {})}
        summary["warmup"] = warmup_sft(
            out_dir,
            train,
            eval_problems=evals,
            num_threads=num_threads,
            model=model,
            tokenizer=tok,
            **wk,
        )
    summary["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "rlalign_ray_tiny.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary
