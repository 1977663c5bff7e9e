"""Tiny, locally built causal LMs for demos and tests (no model hub needed).

* :func:`build_tokenizer` - character-level tokenizer (``tokenizers`` WordLevel
  over single characters) wrapped in ``PreTrainedTokenizerFast``.
* :func:`build_tiny_model` - randomly initialised Llama/Qwen2 of ~0.6M params.
* :func:`warmup_sft` - short in-process supervised pass on ``prompt+answer+eos``.
* :func:`greedy_accuracy` / :func:`sampled_accuracy` - exact-match accuracy with
  the real ``generate`` (left-padded batches).
* :func:`make_tiny_model` - everything above in one call (CLI entry point).

The warm-up lives in ``tiny_sft``, generation and accuracy in ``tiny_eval``; every name
is importable from here.

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

import json
import os
import string
import time

from rlalign_ray.models.tiny_eval import (
    _accuracy,
    _fork_rng,
    _load,
    _num_threads,
    generate_completions,
    greedy_accuracy,
    sampled_accuracy,
)
from rlalign_ray.models.tiny_sft import _encode_sft_batch, warmup_sft

__all__ = [  # with what tiny_eval and tiny_sft hold: import any of it from here
    "BOS",
    "CHAT_TEMPLATE",
    "DEFAULT_ALPHABET",
    "DEFAULT_MODEL_KWARGS",
    "DEFAULT_WARMUP_KWARGS",
    "EOS",
    "MODEL_MAX_LENGTH",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "build_sized_model",
    "build_tiny_model",
    "build_tokenizer",
    "generate_completions",
    "greedy_accuracy",
    "make_tiny_model",
    "num_parameters",
    "sampled_accuracy",
    "warmup_sft",
    "_accuracy",
    "_encode_sft_batch",
    "_fork_rng",
    "_load",
    "_num_threads",
]

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
    from transformers import AutoModelForCausalLM, GenerationConfig

    if tokenizer is None:
        tokenizer = build_tokenizer()
    config = _model_config(
        arch,
        tokenizer,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
    )
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


def _model_config(arch: str, tokenizer, **sizes):
    """The ``arch`` config: tied embeddings, the tokenizer's bos/eos/pad ids."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        **sizes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'qwen2'")


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
