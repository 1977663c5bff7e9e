"""Loading Hugging Face models and computing per-token log-probs of responses."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rlalign_ray.algorithms import entropy_from_logits
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.data.packing import PackedRows, pack
from rlalign_ray.errors import RlalignError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(path: str) -> str:
    """Resolve ``builtin:NAME`` paths (built and cached on first use); others unchanged."""
    if not path.startswith("builtin:"):
        return path
    from rlalign_ray.models.builtin import resolve_model_path

    return resolve_model_path(path)


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
    path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    dropout: bool = True,
    attn_implementation: str | None = None,
) -> Any:
    """A causal LM from a folder, hub id or ``builtin:NAME``; ``dropout=False`` turns every
    dropout off (``without_dropout``); ``attn_implementation``: transformers' attention
    kernel (None: its default)."""
    from transformers import AutoModelForCausalLM

    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        resolve(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kernel
    )
    return model if dropout else without_dropout(model)


def default_device(num_gpus: float | None = None, key: str = "") -> torch.device:
    """The GPU Ray assigned to this actor (it sets CUDA_VISIBLE_DEVICES), else the CPU.

    ``num_gpus``: what the actor's role asked for (``key`` names that config field). An
    actor that asked for GPUs but sees none is an error, never a silent fall-back to the
    CPU: a CPU-only torch build, or a node whose driver does not work, would otherwise
    train (very slowly) on the wrong device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    asked = _ray_gpus()
    asked = num_gpus or 0 if asked is None else asked
    if asked:
        if not torch.cuda.is_available():
            raise RlalignError(
                f"{key or 'this actor'} asks for {asked:g} GPU(s), but torch in this "
                f"process sees no CUDA device (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none: a CPU-only build'}, CUDA_VISIBLE_DEVICES="
                f"{visible!r}); install a CUDA build of torch on every GPU node, or set "
                f"{key or 'resources.num_gpus'}: 0 to run on the CPU"
            )
        return torch.device("cuda", 0)
    if torch.cuda.is_available() and visible != "":
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _ray_gpus() -> float | None:
    """GPUs Ray assigned to this actor (None outside a Ray worker)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return float(len(ray.get_gpu_ids()))


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


def base_hidden(model: Any, device: torch.device, **inputs: torch.Tensor) -> torch.Tensor:
    """(B, L, H) final hidden states of ``model``'s base model on ``inputs`` (moved to
    ``device``; no cache).

    ``model`` (a Hugging Face causal LM, or a DeepSpeed engine around one) runs whole, so
    ZeRO-3's hooks see an ordinary forward; the hidden states are taken from its base
    model's output and the output head runs on one position only (``logits_to_keep``).
    """
    hf = hf_model(model)
    if hf.base_model is hf:
        raise ValueError(f"{type(hf).__name__} has no base model to take hidden states from")
    keep = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(hf.forward).parameters
        else {}
    )
    captured: list[torch.Tensor] = []
    hook = hf.base_model.register_forward_hook(lambda _m, _i, out: captured.append(out[0]))
    try:
        model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False, **keep)
    finally:
        hook.remove()
    return captured[0]


def response_hidden(model: Any, batch: RolloutBatch, device: torch.device) -> torch.Tensor:
    """(B, T, H) final hidden states that predict each response token (padded rows)."""
    attn = batch.attention_mask()
    hidden = base_hidden(
        model,
        device,
        input_ids=batch.input_ids(),
        attention_mask=attn,
        position_ids=position_ids(attn),
    )
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    return hidden[:, p - 1 : p + t - 1]


def pack_for(model: Any, batch: RolloutBatch) -> PackedRows:
    """``batch``'s rows packed for ``model``: one sequence under flash attention (its
    varlen kernels attend within each row only), else bins as wide as the longest row (a
    dense mask costs the square of its sequence; see ``data.packing.pack``)."""
    impl = str(getattr(hf_model(model).config, "_attn_implementation", "") or "")
    return pack(batch, None if "flash" in impl else 0)


def packed_response_hidden(model: Any, batch: RolloutBatch, device: torch.device) -> torch.Tensor:
    """(N, H) final hidden states that predict the N counted response tokens (those of
    ``response_mask``, row by row), from one forward of the packed rows (``pack_for``)."""
    rows = pack_for(model, batch)
    hidden = base_hidden(model, device, input_ids=rows.input_ids, position_ids=rows.position_ids)
    return hidden.flatten(0, 1)[rows.predictors.to(device)]


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
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of the response tokens under softmax(logits / temperature), zero
    outside ``response_mask``, and their (B, T) entropy when ``entropy`` is ``"loss"``
    (with a graph) or ``"metric"`` (without); None for ``"none"``.

    The output head runs only on the response tokens in the mask, at most ``chunk_size`` of
    them at a time (0: all at once); with a graph, each chunk's head and log-softmax are
    recomputed in backward (``torch.utils.checkpoint``), so only hidden states are kept,
    never (B, T, V) logits. ``agree`` maps this rank's chunk count to the one all ranks use
    (ZeRO-3 gathers the head's weights at every call, so every rank must call it as often).
    ``packed``: one forward of the rows packed end to end (``packed_response_hidden``),
    the same values as the padded forward (``packing_problem`` checks a model for it).
    """
    mask = batch.response_mask.to(device) != 0
    if packed:
        h = packed_response_hidden(model, batch, device)
    else:
        h = response_hidden(model, batch, device)[mask]
    tokens = batch.response_ids.to(device)[mask]
    hf = hf_model(model)
    head, transform = hf.get_output_embeddings(), logit_transform(hf.config)
    chunks = max(-(-len(h) // chunk_size) if chunk_size else 1, 1)
    chunks = agree(chunks) if agree is not None else chunks
    recompute = chunk_size > 0 and torch.is_grad_enabled()
    parts = []
    for hc, tc in zip(h.tensor_split(chunks), tokens.tensor_split(chunks)):
        args = (head, hc, tc, temperature, entropy, transform)
        parts.append(
            checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            if recompute
            else _chunk_logprobs(*args)
        )
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    logp = zeros.masked_scatter(mask, torch.cat([lp for lp, _ in parts]))
    if entropy == "none":
        return logp, None
    return logp, zeros.masked_scatter(mask, torch.cat([e for _, e in parts]))


@torch.no_grad()
def batch_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float,
    micro_batch_size: int,
    device: torch.device,
    chunk_size: int = 0,
    agree: Callable[[int], int] | None = None,
    groups: list[torch.Tensor] | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens, zero on padding: one forward per
    ``micro_batch_size`` rows, or per group of row indices in ``groups``; ``packed``: each
    forward on packed rows (``response_logprobs``)."""
    if groups is None:
        step = micro_batch_size
        groups = [torch.arange(s, min(s + step, len(batch))) for s in range(0, len(batch), step)]
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    for rows in groups:
        mb = batch.select(rows).trimmed()
        lp, _ = response_logprobs(
            model, mb, device, temperature, chunk_size, agree=agree, packed=packed
        )
        out[rows, : lp.shape[1]] = lp.cpu()
    return out


@torch.no_grad()
def packing_problem(model: Any, device: torch.device) -> str | None:
    """Why packed rows would not give ``model`` the padded rows' results (None: they do).

    Runs three short rows packed as training packs them (``pack_for``; two of them share a
    sequence) and padded: the hidden states before their response tokens must agree (to
    float rounding of the model's dtype). A model or attention kernel that ignores packed
    position ids would let a row attend to its neighbour, or give it the wrong positions.
    Every rank of a ZeRO-3 group must call it (it runs forwards)."""
    hf = hf_model(model)
    batch = _probe_batch(
        int(getattr(hf.config, "vocab_size", 0) or 2), getattr(hf.config, "pad_token_id", 0)
    )
    training = hf.training
    hf.eval()
    try:
        packed = packed_response_hidden(model, batch, device).float()
        padded = response_hidden(model, batch, device)[batch.response_mask.to(device) != 0].float()
    except Exception as e:  # noqa: BLE001 (any failure means: do not pack)
        return f"a packed forward failed ({type(e).__name__}: {e})"
    finally:
        hf.train(training)
    tol = 1e-3 if next(hf.parameters()).dtype == torch.float32 else 5e-2
    err = float((packed - padded).abs().max() / padded.abs().max().clamp(min=1e-6))
    if not err <= tol:
        impl = getattr(hf.config, "_attn_implementation", None)
        return (
            f"{type(hf).__name__} (attention {impl!r}) lets packed rows see each other or "
            f"ignores their position ids (relative difference {err:.2g} from padded rows)"
        )
    return None


def _probe_batch(vocab: int, pad_id: int | None) -> RolloutBatch:
    """Rows of 2 prompt + 6, 3 and 1 response tokens (random ids): packed in bins of the
    longest row, the second and third share one."""
    g = torch.Generator().manual_seed(0)
    rlen = torch.tensor([6, 3, 1])
    mask = (torch.arange(6)[None, :] < rlen[:, None]).float()
    return RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (3, 2), generator=g),
        prompt_mask=torch.ones(3, 2, dtype=torch.long),
        response_ids=torch.randint(0, vocab, (3, 6), generator=g) * mask.long(),
        response_len=rlen,
        response_mask=mask,
        logprobs=torch.zeros(3, 6),
        version=0,
        group_ids=torch.arange(3),
        prompts=[""] * 3,
        completions=[""] * 3,
        columns={},
        pad_id=pad_id or 0,
    )


def use_packing(model: Any, device: torch.device, key: str) -> bool:
    """Whether the role whose ``key`` (``learner.packing``, ...) is on can pack ``model``'s
    rows; if not, a warning says why and the role runs padded rows (the same results)."""
    problem = packing_problem(model, device)
    if problem:
        logging.getLogger("rlalign_ray").warning(
            "%s: %s; running padded micro-batches instead (the same results, more compute)",
            key,
            problem,
        )
    return problem is None
