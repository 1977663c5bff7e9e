"""Loading Hugging Face models and computing per-token log-probs of responses."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rlalign_ray.algorithms import entropy_from_logits
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.errors import ConfigError, RlalignError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(path: str) -> str:
    """Resolve ``builtin:NAME`` paths (built and cached on first use); others unchanged."""
    if not path.startswith("builtin:"):
        return path
    from rlalign_ray.models.builtin import resolve_model_path

    return resolve_model_path(path)


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``name`` or ``org/name``)."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.path.exists(path)
    )


def check_model_path(key: str, path: str, need_config: bool = True) -> None:
    if path.startswith("builtin:"):
        return
    if not _looks_local(path):
        return  # a hub id: the actors download it
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            [
                f"{key}: {path!r} does not exist (relative paths start at {Path.cwd()}); "
                "give a local model folder, a Hugging Face hub id, or builtin:tiny-arith"
            ]
        )
    if not p.is_dir():
        raise ConfigError([f"{key}: {path!r} is a file; give the model's folder"])
    if need_config and not (p / "config.json").is_file():
        raise ConfigError(
            [
                f"{key}: {path!r} has no config.json, so it is not a saved Hugging Face "
                "model; point it at the folder save_pretrained() wrote"
            ]
        )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, dropout: bool = True
) -> Any:
    """A causal LM from a folder, hub id or ``builtin:NAME``; ``dropout=False`` turns every
    dropout off (``without_dropout``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return model if dropout else without_dropout(model)


def default_device(num_gpus: float | None = None, key: str = "") -> torch.device:
    """The GPU Ray assigned to this actor (made the current CUDA device), else the CPU.

    ``num_gpus``: what the actor's role asked for (``key`` names that config field). An
    actor that asked for GPUs but sees none is an error, never a silent fall-back to the
    CPU: a CPU-only torch build, or a node whose driver does not work, would otherwise
    train (very slowly) on the wrong device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ray_ids = _ray_gpu_ids()
    asked = num_gpus or 0 if ray_ids is None else len(ray_ids)
    if asked:
        if not torch.cuda.is_available():
            raise RlalignError(
                f"{key or 'this actor'} asks for {asked:g} GPU(s), but torch in this "
                f"process sees no CUDA device (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none: a CPU-only build'}, CUDA_VISIBLE_DEVICES="
                f"{visible!r}); install a CUDA build of torch on every GPU node, or set "
                f"{key or 'resources.num_gpus'}: 0 to run on the CPU"
            )
        device = torch.device("cuda", gpu_index(ray_ids, os.environ.get("CUDA_VISIBLE_DEVICES")))
        torch.cuda.set_device(device)
        return device
    if torch.cuda.is_available() and visible != "":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gpu_index(ray_ids: list[str] | None, visible: str | None) -> int:
    """The CUDA device index, in this process, of the first GPU Ray assigned (``ray_ids``,
    as ``ray.get_gpu_ids()`` names them; None or []: not a Ray actor, the current device).
    Ray normally sets CUDA_VISIBLE_DEVICES (``visible``) to exactly its GPUs, so that is
    index 0; where it does not (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``) the id is
    found among the visible devices, or is the physical index itself."""
    if not ray_ids:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    first = str(ray_ids[0])
    shown = [d.strip() for d in visible.split(",")] if visible else []
    if first in shown:
        return shown.index(first)
    return int(first) if first.isdigit() and not shown else 0


def _ray_gpu_ids() -> list[str] | None:
    """GPUs Ray assigned to this actor (None outside a Ray worker)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return [str(i) for i in ray.get_gpu_ids()]


DROPOUT_KEYS = ("dropout", "pdrop")  # config fields: attention_dropout, resid_pdrop, ...


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every dropout of ``model`` off (``model.keep_dropout: false``, the default).

    With dropout on, a train-mode forward differs from the eval-mode one that computed the
    old log-probs and values: PPO's ratio is not 1 before any update, and the clipped value
    loss compares noisy predictions with clean old values. Zeroes the config's dropout
    probabilities (``attention_dropout``, ``resid_pdrop``, ``classifier_dropout``, ...),
    every ``nn.Dropout`` (a token-classification head's defaults to 0.1 whatever the
    config says) and every float attribute named like one that modules read at forward
    time (Llama's ``attention_dropout``). LoRA's own dropout (``learner.lora.dropout``)
    is an explicit choice and is left alone."""
    configs = [getattr(model, "config", None)]
    while configs:
        c = configs.pop()
        if c is None:
            continue
        for k, v in vars(c).items():
            if any(d in k for d in DROPOUT_KEYS) and isinstance(v, float):
                setattr(c, k, 0.0)
            elif hasattr(v, "to_dict") and hasattr(v, "model_type"):
                configs.append(v)  # text_config, vision_config, ...
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for k, v in vars(module).items():
            if any(d in k for d in DROPOUT_KEYS) and isinstance(v, float):
                setattr(module, k, 0.0)
    return model


def set_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs Ray gave this actor."""
    torch.set_num_threads(max(1, int(num_cpus)))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hf_model(model: Any) -> Any:
    """The Hugging Face model inside a DeepSpeed engine and/or a peft ``PeftModel`` (its
    adapted layers in place)."""
    hf = getattr(model, "module", model)
    return hf.get_base_model() if hasattr(hf, "get_base_model") else hf


def response_hidden(model: Any, batch: RolloutBatch, device: torch.device) -> torch.Tensor:
    """(B, T, H) final hidden states that predict each response token.

    ``model`` (a Hugging Face causal LM, or a DeepSpeed engine around one) runs whole, so
    ZeRO-3's hooks see an ordinary forward; the hidden states are taken from its base
    model's output and the output head runs on one position only (``logits_to_keep``).
    """
    hf = hf_model(model)
    if hf.base_model is hf:
        raise ValueError(f"{type(hf).__name__} has no base model to take hidden states from")
    ids = batch.input_ids().to(device)
    attn = batch.attention_mask().to(device)
    keep = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(hf.forward).parameters
        else {}
    )
    captured: list[torch.Tensor] = []
    hook = hf.base_model.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=position_ids(attn),
            use_cache=False,
            **keep,
        )
    finally:
        hook.remove()
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    return captured[0][:, p - 1 : p + t - 1]


class _TokenLogprob(torch.autograd.Function):
    """(N, V) logits, (N,) tokens -> (N,) log softmax(logits)[tokens] and (N,) logsumexp (no
    gradient). Backward holds one (N, V) tensor: d logp / d logits = onehot - softmax."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor):
        logz = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, tokens, logz)
        ctx.mark_non_differentiable(logz)
        return logits.gather(-1, tokens[:, None]).squeeze(-1) - logz, logz

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        logits, tokens, logz = ctx.saved_tensors
        dlogits = (logits - logz[:, None]).exp_().mul_(-grad[:, None])
        return dlogits.scatter_add_(1, tokens[:, None], grad[:, None]), None


def logit_transform(config: Any) -> tuple[float, float | None]:
    """What a model does to its head's output before returning logits, which applying the
    head ourselves must repeat: ``(scale, softcap)``, logits = softcap * tanh(scale * x /
    softcap) (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma-2/3's
    ``final_logit_softcapping``)."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, float(softcap) if softcap else None


def _chunk_logprobs(
    head: torch.nn.Module,
    h: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    entropy: str,
    transform: tuple[float, float | None] = (1.0, None),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, H) hidden states, (N,) tokens -> (N,) log-probs and (N,) entropy (or None)."""
    logits = head(h).float()  # the only (N, V) tensor; changed in place from here on
    scale, softcap = transform
    if softcap is not None:
        logits = torch.tanh(logits * (scale / softcap)) * softcap
    elif scale != 1.0:
        logits.mul_(scale)
    if temperature != 1.0:
        logits.div_(temperature)
    logp, logz = _TokenLogprob.apply(logits, tokens)
    if entropy == "loss":
        return logp, entropy_from_logits(logits)
    if entropy == "metric":  # last and without a graph: a checkpoint's recompute stops before it
        with torch.no_grad():  # H = logz - sum_v p_v z_v, with one (N, V) temporary
            probs = (logits - logz[:, None]).exp_()
            return logp, logz - torch.linalg.vecdot(probs, logits)
    return logp, None


def response_logprobs(
    model: Any,
    batch: RolloutBatch,
    device: torch.device,
    temperature: float,
    chunk_size: int = 0,
    entropy: str = "none",
    agree: Callable[[int], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the response tokens under softmax(logits / temperature), zero
    outside ``response_mask``, and their (B, T) entropy when ``entropy`` is ``"loss"``
    (with a graph) or ``"metric"`` (without); None for ``"none"``.

    The output head runs only on the response tokens in the mask, at most ``chunk_size`` of
    them at a time (0: all at once); with a graph, each chunk's head and log-softmax are
    recomputed in backward (``torch.utils.checkpoint``), so only hidden states are kept,
    never (B, T, V) logits. ``agree`` maps this rank's chunk count to the one all ranks use
    (ZeRO-3 gathers the head's weights at every call of the head module, so every rank must
    call it as often). A ZeRO-3 learner's model holds a ``LogprobHead``
    (``attach_logprob_head``), which applies the head in one module call.
    """
    hidden = response_hidden(model, batch, device)
    mask = batch.response_mask.to(device) != 0
    h, tokens = hidden[mask], batch.response_ids.to(device)[mask]
    hf = hf_model(model)
    head, transform = hf.get_output_embeddings(), logit_transform(hf.config)
    chunks = max(-(-len(h) // chunk_size) if chunk_size else 1, 1)
    chunks = agree(chunks) if agree is not None else chunks
    recompute = chunk_size > 0 and torch.is_grad_enabled()
    args = (h, tokens, temperature, entropy, transform, chunks, recompute)
    wrapped = getattr(hf, LOGPROB_HEAD, None)  # ZeRO-3: the head in one module call
    logp, ent = wrapped(*args) if wrapped is not None else head_logprobs(head, *args)
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    logp = zeros.masked_scatter(mask, logp)
    return logp, None if ent is None else zeros.masked_scatter(mask, ent)


def head_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    entropy: str,
    transform: tuple[float, float | None],
    chunks: int,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, H) hidden states, (N,) tokens -> (N,) log-probs and entropy (None for "none"),
    the head applied to ``chunks`` slices in turn (``recompute``: each in backward again)."""
    parts = []
    for hc, tc in zip(h.tensor_split(chunks), tokens.tensor_split(chunks)):
        args = (head, hc, tc, temperature, entropy, transform)
        parts.append(
            checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            if recompute
            else _chunk_logprobs(*args)
        )
    logp = torch.cat([lp for lp, _ in parts])
    return logp, None if entropy == "none" else torch.cat([e for _, e in parts])


LOGPROB_HEAD = "rlalign_logprob_head"  # the attribute a ZeRO-3 learner's model holds it in


class LogprobHead(torch.nn.Module):
    """The model's output head over the response tokens, chunked, as one module call.

    ZeRO-3 gathers a module's parameters when it is called and prefetches the next
    module's from the order it recorded on the first steps. Calling the head once per
    chunk after the model's forward makes that order change with the number of chunks,
    and DeepSpeed then drops its trace and stops prefetching. This module is called once
    per micro-batch whatever the chunks; it holds no parameters of its own (the head is
    not a submodule: its parameters keep their one name) but registers the head's as
    external ones, which DeepSpeed gathers for its forward and for its backward (where
    the chunks are recomputed)."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self._head = [head]  # a list: not registered as a submodule

    def forward(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self._head[0]
        return head_logprobs(lambda x: torch.nn.functional.linear(x, head.weight, head.bias), *args)


def attach_logprob_head(model: torch.nn.Module) -> bool:
    """Give a ZeRO-3 learner's model a ``LogprobHead`` (before ``deepspeed.initialize``,
    which hooks every module); False when its head is not a plain linear layer (it is
    then called per chunk, as without ZeRO-3)."""
    import deepspeed

    hf = hf_model(model)
    head = hf.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return False
    wrapper = LogprobHead(head)
    hf.add_module(LOGPROB_HEAD, wrapper)
    for p in head.parameters():
        deepspeed.zero.register_external_parameter(wrapper, p)
    return True


@torch.no_grad()
def batch_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float,
    micro_batch_size: int,
    device: torch.device,
    chunk_size: int = 0,
    agree: Callable[[int], int] | None = None,
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens, micro-batched, zero on padding."""
    outs = []
    width = batch.response_ids.shape[1]
    for start in range(0, len(batch), micro_batch_size):
        mb = batch.select(list(range(start, min(start + micro_batch_size, len(batch))))).trimmed()
        lp, _ = response_logprobs(model, mb, device, temperature, chunk_size, agree=agree)
        outs.append(torch.nn.functional.pad(lp.cpu(), (0, width - lp.shape[1])))
    return torch.cat(outs)
