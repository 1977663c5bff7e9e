"""The generation side: rollout (the generator pool), sync (weights to it), reward and env."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from rlalign_ray.config.fields import DistBackend, Dtype, Placement, Resources, doc

InflightKV = Literal["recompute", "keep"]
Transport = Literal["auto", "collective", "cuda_ipc", "shared_memory", "object_store"]
TRANSPORTS = typing.get_args(Transport)
NonfiniteMode = Literal["error", "zero", "drop_group"]
NONFINITE_MODES = typing.get_args(NonfiniteMode)
EnvRewardMode = Literal["sum", "last", "rewards-only"]
ENV_REWARD_MODES = typing.get_args(EnvRewardMode)


@dataclass
class VLLMConfig:
    """The vllm backend's keys (``rollout.vllm``)."""

    tensor_parallel_size: int = doc(1, "GPUs per engine (tensor parallel)")
    gpu_memory_utilization: float = doc(0.5, "on GPU: share of the GPU for weights + KV")
    kv_cache_gb: float = doc(1.0, "on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int = doc(0, "context length (0: max_prompt_tokens + max_new_tokens)")
    enable_sleep_mode: bool = doc(
        False, "on GPU: free weights and KV cache while the learner trains (colocation)"
    )
    enforce_eager: bool = doc(True, "no CUDA graphs / compilation (faster start)")


# Keys that moved into a backend's section: refused where they were, naming where they went.
MOVED_KEYS = {
    f"rollout.{f}": f"rollout.vllm.{f}"
    for f in (
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "kv_cache_gb",
        "max_model_len",
        "enable_sleep_mode",
        "enforce_eager",
    )
}


@dataclass
class RolloutConfig:
    prompts_per_step: int = doc(8, "prompts sampled per training step")
    n_samples: int = doc(4, "responses per prompt (the group size for GRPO)")
    max_new_tokens: int = doc(16, "longest response in tokens")
    temperature: float = doc(1.0, "sampling temperature (the learner scores with the same)")
    top_p: float = doc(1.0, "nucleus sampling threshold")
    top_k: int = doc(0, "top-k sampling (0: off)")
    eval_temperature: float = doc(0.0, "0: greedy evaluation")
    ignore_eos: bool = doc(False, "always sample max_new_tokens, even past EOS (benchmarks)")
    backend: str = doc(
        "hf",
        "generation backend, which reads its own section (rollout.<name>) and checks it "
        "(rlalign_ray/rollout/backends.py); module:Class: a backend of your own",
    )
    dtype: Dtype | None = doc(
        None, "generator weights dtype (weights travel in it); null: model.dtype"
    )
    vllm: VLLMConfig = doc(VLLMConfig(), "the vllm backend's keys")
    kwargs: dict[str, Any] = doc(
        {}, "options of a backend of your own (backend: module:Class), which reads them"
    )
    num_actors: int = doc(2, "generator actors in the pool")
    resources: Resources = doc(Resources(), "per generator actor")
    placement: Placement = doc(Placement(), "where the generators go")
    actor_class: str | None = doc(None, "module:Class to run instead of the built-in generator")
    micro_batch_size: int = doc(64, "sequences per generate() call inside one actor")
    chunk_size: int = doc(
        0,
        "prompts per unit of work idle generators pull (0: one static chunk per generator)",
    )
    timeout_s: float = doc(
        1800.0, "fail if one generation call (a chunk on one generator) takes longer than this"
    )
    stop: list[str] = doc(
        [],
        "stop strings (vLLM semantics): a response ends with the token that completes one; "
        "its text (what rewards see) is cut before it",
    )
    include_stop_str_in_output: bool = doc(False, "keep the matched stop string in the text")
    dispatch_group: int = doc(
        0,
        "generators per dispatcher actor, which pulls chunks for its group, has each scored "
        "and loads new weights, so the driver calls each group once (0: the driver calls "
        "every generator itself)",
    )
    inflight_updates: bool = doc(
        False,
        "pipelined runs: a generator loads a new weight version between two decode steps of "
        "the chunk it is sampling and continues the same sequences (each token records the "
        "version that sampled it); needs trainer.max_staleness >= 1",
    )
    inflight_kv: InflightKV = doc(
        "recompute",
        "in-flight updates: after a load, recompute the KV cache of the sequences in progress "
        "with the new weights (recompute), or keep the one computed with the old (keep)",
    )


@dataclass
class SyncConfig:
    """How new weights travel from learner rank 0 to the generators."""

    transport: Transport = doc(
        "auto",
        "auto (on GPU: cuda_ipc for generators sharing a learner rank's GPU, else collective; "
        "on CPU: shared_memory on one node, else object_store), "
        "collective (gloo/NCCL group), shared_memory (a file in /dev/shm, one node), "
        "object_store (Ray's shared-memory store), cuda_ipc (generators sharing a learner "
        "rank's GPU read its weights in place; auto picks it for them)",
    )
    bucket_mb: float = doc(256.0, "weights travel in buckets of about this many MiB")
    backend: DistBackend = doc(
        "auto", "collective transport: auto (nccl on GPU, gloo on CPU), gloo, nccl"
    )
    timeout_s: float = doc(600.0, "fail a weight sync (or the group's set-up) after this")


@dataclass
class RewardSpec:
    """One reward; the total is the weighted sum."""

    name: str = doc("", "label in metrics (default: derived from type and path)")
    type: str = doc(
        "function",
        "the reward's type, which reads the keys named after it and checks them "
        "(rlalign_ray/rewards/types.py); module:Class: a RewardType of your own",
    )
    path: str = doc("", "module:function, or a model path for model/embedding")
    weight: float = doc(1.0, "weight in the total reward")
    reference_key: str = doc("reference", "embedding reward: dataset column with the target")
    batch_size: int = doc(32, "model rewards: sequences per forward pass; http: per request")
    url: str = doc("", "http: the endpoint; POST {prompts, completions, ...} -> {rewards}")
    timeout_s: float = doc(30.0, "http: seconds one request may take")
    retries: int = doc(2, "http: further tries after a failed or timed-out request")
    token_env: str = doc("", "http: environment variable holding a bearer token (empty: none)")
    answer_key: str = doc(
        "answer", "math: dataset column with the gold answer (a number, LaTeX, or '... #### 72')"
    )
    format_weight: float = doc(
        0.0,
        "math: weight of the format component <name>_format (1 where the final answer is in "
        "\\boxed{} or after ####), logged even at 0",
    )
    kwargs: dict[str, Any] = doc(
        {}, "options of a reward type of your own (type: module:Class), which reads them"
    )


@dataclass
class RewardConfig:
    rewards: list[RewardSpec] = doc([], "the rewards, summed with their weights")
    num_actors: int = doc(1, "reward actors in the pool")
    resources: Resources = doc(Resources(), "per reward actor")
    placement: Placement = doc(Placement(), "where the reward actors go")
    actor_class: str | None = doc(None, "module:Class to run instead of the built-in scorer")
    timeout_s: float = doc(
        600.0, "fail if one reward on one batch takes longer than this (0: no limit)"
    )
    on_nonfinite: NonfiniteMode = doc(
        "error",
        "a NaN/inf reward: error (stop, naming it), zero (count it as 0), drop_group "
        "(leave its prompt's group out of the step)",
    )


@dataclass
class EnvConfig:
    """Multi-turn rollouts: each sample is an episode of an environment (``rlalign_ray.envs``)."""

    path: str | None = doc(None, "module:Class of an envs.Env subclass (null: single-turn)")
    kwargs: dict[str, Any] = doc({}, "keyword arguments for the environment class")
    max_turns: int = doc(4, "actions per episode at most; episodes cut there are truncated")
    stop: list[str] = doc([], "strings that end an action (besides EOS), kept in the action")
    reward: EnvRewardMode = doc(
        "sum", "per-turn env rewards: sum, last, or rewards-only (only reward.rewards count)"
    )
    timeout_s: float = doc(60.0, "fail if one reset/step call takes longer (0: no limit)")
    max_context_tokens: int = doc(
        0, "end an episode (truncated) before its context exceeds this (0: the model's limit)"
    )
    num_actors: int = doc(0, "0: environments run inside the generators; >0: a pool of actors")
    resources: Resources = doc(Resources(num_cpus=0.5), "per environment actor")
    placement: Placement = doc(Placement(), "where the environment actors go")
