"""One typed config tree, loaded from YAML with dotted command-line overrides.

    cfg = load_config("configs/demo_cpu.yaml", ["trainer.steps=20", "rollout.n_samples=8"])

Every field has a one-line doc (``doc(default, "...")``). Unknown keys, wrong types and
impossible combinations are reported together, before any actor starts, as a
``ConfigError`` naming each key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlalign_ray.errors import ConfigError
from rlalign_ray.roles import gpu_layout_problems, role_layout


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default (copied if mutable) and a one-line doc."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = lambda d=default: _copy(d)  # noqa: E731
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


# --------------------------------------------------------------------------------------
# Roles and resources
# --------------------------------------------------------------------------------------


@dataclass
class Resources:
    """What one actor of a role asks Ray for."""

    num_cpus: float = doc(1.0, "logical CPUs per actor")
    num_gpus: float = doc(0.0, "GPUs per actor (fractions allowed, e.g. 0.5 to share a GPU)")
    memory_gb: float = doc(0.0, "memory to reserve per actor in GiB (0: no reservation)")
    custom: dict[str, float] = doc({}, "custom Ray resources per actor, e.g. {node_a: 1}")

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb > 0:
            opts["memory"] = int(self.memory_gb * 1024**3)
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts

    def bundle(self) -> dict[str, float]:
        b: dict[str, float] = {"CPU": self.num_cpus}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        if self.memory_gb > 0:
            b["memory"] = float(int(self.memory_gb * 1024**3))
        b.update(self.custom)
        return {k: v for k, v in b.items() if v}


STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class Placement:
    """Where a role's actors go (Ray placement groups do the scheduling)."""

    strategy: str = doc(
        "PACK", "PACK (few nodes), SPREAD (across nodes), STRICT_PACK, STRICT_SPREAD"
    )
    colocate_with: str | None = doc(
        None, "share another role's bundles (same nodes, same GPUs), e.g. learner"
    )
    node_labels: dict[str, str] = doc({}, "only on nodes with these Ray node labels")


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    seed: int = doc(0, "seed for prompt sampling, generation and model init")
    ray_address: str | None = doc(
        None, "Ray cluster to attach to; null: RAY_ADDRESS, else an embedded local instance"
    )
    num_cpus: float | None = doc(
        None, "CPUs of the embedded instance; null: enough for every role (roles take turns)"
    )
    placement_timeout_s: float = doc(120.0, "fail if the actors cannot be placed within this")
    call_timeout_s: float = doc(1800.0, "fail if one actor call takes longer than this")
    max_actor_restarts: int = doc(
        3,
        "per role (generator, reward, reference): actors that die are replaced in their "
        "placement bundle and their unfinished work re-issued, at most this many times a run "
        "(0: an actor that dies ends the run)",
    )
    max_learner_restarts: int = doc(
        0,
        "a learner (or critic) rank that dies: restart the group from the last checkpoint "
        "inside the same run, at most this many times (0: the run ends, naming the checkpoint)",
    )
    driver_threads: int = doc(
        1,
        "torch threads of the driver process while it trains (its tensor work is a batch's "
        "advantages and scores; on cores shared with actors, idle OpenMP threads spin-wait "
        "and cost the driver ~50x more CPU per small op); 0: leave torch's setting",
    )


@dataclass
class ModelConfig:
    path: str = doc("builtin:tiny-arith", "policy: HF hub id, local folder, or builtin:NAME")
    tokenizer: str | None = doc(None, "tokenizer path; null: the model path")
    reference: str | None = doc(None, "reference model path; null: the initial policy")
    dtype: str = doc("float32", "parameter dtype: float32, bfloat16 or float16")
    trust_remote_code: bool = doc(False, "allow model code from the hub")
    keep_dropout: bool = doc(
        False,
        "train policy and critic with the model's own dropout (its config's *dropout* "
        "probabilities, a value head's 0.1); off: every dropout is 0, so PPO's ratio is 1 "
        "and the value loss compares like with like before an update",
    )
    chat_template: bool = doc(False, "wrap prompts with the tokenizer's chat template")
    chat_template_kwargs: dict[str, Any] = doc(
        {}, "extra variables for the chat template (e.g. {enable_thinking: false})"
    )


@dataclass
class DataConfig:
    train: str = doc(
        "configs/data/arith_train.jsonl",
        "training prompts: a JSONL or Parquet file, or a datasets save_to_disk folder",
    )
    eval: str | dict[str, str] | None = doc(
        "configs/data/arith_eval.jsonl",
        "held-out prompts (same formats as data.train): one file or folder (metrics eval/...), "
        "or a mapping name -> path, one eval set each (metrics eval/<name>/...)",
    )
    prompt_key: str = doc("prompt", "key holding the prompt (a string, or a list of messages)")
    max_prompt_tokens: int = doc(512, "longest prompt in tokens (see data.truncation)")
    truncation: str = doc(
        "error",
        "a prompt over max_prompt_tokens: error (stop, naming file:line), left (keep its "
        "last tokens, count data/truncated), drop (leave it out, count data/dropped)",
    )
    eval_limit: int = doc(0, "evaluate on at most this many held-out prompts (0: all)")


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
        "hf", "generation backend: hf (transformers, own sampling loop) or vllm (vLLM engine)"
    )
    dtype: str | None = doc(
        None, "generator weights dtype (weights travel in it); null: model.dtype"
    )
    tensor_parallel_size: int = doc(1, "vllm: GPUs per engine (tensor parallel)")
    gpu_memory_utilization: float = doc(0.5, "vllm on GPU: share of the GPU for weights + KV")
    kv_cache_gb: float = doc(1.0, "vllm on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int = doc(0, "vllm: context length (0: max_prompt_tokens + max_new_tokens)")
    enable_sleep_mode: bool = doc(
        False, "vllm on GPU: free weights and KV cache while the learner trains (colocation)"
    )
    enforce_eager: bool = doc(True, "vllm: no CUDA graphs / compilation (faster start)")
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


TRANSPORTS = ("auto", "collective", "cuda_ipc", "shared_memory", "object_store")


@dataclass
class SyncConfig:
    """How new weights travel from learner rank 0 to the generators."""

    transport: str = doc(
        "auto",
        "auto (on GPU: cuda_ipc for generators sharing a learner rank's GPU, else collective; "
        "on CPU: shared_memory on one node, else object_store), "
        "collective (gloo/NCCL group), shared_memory (a file in /dev/shm, one node), "
        "object_store (Ray's shared-memory store), cuda_ipc (generators sharing a learner "
        "rank's GPU read its weights in place; auto picks it for them)",
    )
    bucket_mb: float = doc(256.0, "weights travel in buckets of about this many MiB")
    backend: str = doc("auto", "collective transport: auto (nccl on GPU, gloo on CPU), gloo, nccl")
    timeout_s: float = doc(600.0, "fail a weight sync (or the group's set-up) after this")


@dataclass
class RewardSpec:
    """One reward; the total is the weighted sum."""

    name: str = doc("", "label in metrics (default: derived from type and path)")
    type: str = doc("function", "function (module:fn), model (sequence classifier), embedding")
    path: str = doc("", "module:function, or a model path for model/embedding")
    weight: float = doc(1.0, "weight in the total reward")
    reference_key: str = doc("reference", "embedding reward: dataset column with the target")
    batch_size: int = doc(32, "model rewards: sequences per forward pass; http: per request")
    url: str = doc("", "http: the endpoint; POST {prompts, completions, ...} -> {rewards}")
    timeout_s: float = doc(30.0, "http: seconds one request may take")
    retries: int = doc(2, "http: further tries after a failed or timed-out request")
    token_env: str = doc("", "http: environment variable holding a bearer token (empty: none)")


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
    on_nonfinite: str = doc(
        "error",
        "a NaN/inf reward: error (stop, naming it), zero (count it as 0), drop_group "
        "(leave its prompt's group out of the step)",
    )


@dataclass
class AlgorithmConfig:
    name: str = doc(
        "grpo", "advantage estimator: ppo, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline"
    )
    kl_coef: float = doc(0.0, "KL coefficient (0: no reference model is started)")
    kl_estimator: str = doc("k3", "KL estimator: k1, k2, k3 or abs")
    kl_in_reward: bool = doc(False, "KL as a per-token reward penalty (else a loss term)")
    kl_target: float = doc(0.0, "adaptive KL controller target (0: fixed kl_coef)")
    kl_horizon: int = doc(10000, "adaptive KL controller horizon in samples")
    clip_low: float = doc(0.2, "PPO clip: ratio >= 1 - clip_low")
    clip_high: float = doc(0.2, "PPO clip: ratio <= 1 + clip_high (DAPO clip-higher: 0.28)")
    dual_clip: float | None = doc(None, "dual-clip constant c > 1 for negative advantages")
    loss_agg: str = doc("token-mean", "loss aggregation mode")
    entropy_coef: float = doc(0.0, "entropy bonus coefficient")
    gamma: float = doc(1.0, "discount for GAE and REINFORCE++ returns")
    lam: float = doc(0.95, "GAE lambda (ppo)")
    whiten_advantages: bool = doc(True, "ppo: whiten GAE advantages over the batch")
    dynamic_sampling: bool = doc(False, "DAPO: drop groups whose rewards are all equal, refill")
    max_refills: int = doc(2, "dynamic sampling: extra generation rounds per step at most")
    overlong_buffer: int = doc(
        0, "DAPO overlong penalty: tokens before max_new_tokens where the penalty ramps up (0: off)"
    )
    overlong_penalty: float = doc(1.0, "DAPO overlong penalty at max_new_tokens")
    use_behaviour_logprobs: bool = doc(
        False, "use the generator's log-probs as old log-probs instead of a learner pass"
    )
    behaviour_is_cap: float | None = doc(
        None,
        "truncated importance weight pi_learner/pi_generator per token, capped (0: off; "
        "null: off when trainer.max_staleness is 0, else 2.0)",
    )


@dataclass
class DeepSpeedRole:
    """A data-parallel DeepSpeed group (the policy learner, the critic)."""

    world_size: int = doc(1, "ranks (one Ray actor per rank, data parallel)")
    resources: Resources = doc(Resources(), "per rank")
    placement: Placement = doc(Placement(), "where the ranks go")
    actor_class: str | None = doc(None, "module:Class to run instead of the built-in rank")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage 0-3")
    backend: str = doc("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU)")
    optimizer: str = doc("adamw", "adamw, or sgd (plain gradient steps: for exactness checks)")
    lr: float = doc(1e-5, "learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas")
    grad_clip: float = doc(1.0, "gradient norm clip (0: off)")
    micro_batch_size: int = doc(8, "sequences per forward/backward on one rank")
    bf16: bool = doc(False, "train in bf16 (GPU)")
    logprob_chunk_size: int = doc(
        512,
        "log-probs computed for this many response tokens at a time, recomputed in backward "
        "(0: all at once)",
    )
    max_tokens_per_micro_batch: int = doc(
        0,
        "token-budget micro-batches in the update: at most this many padded (prompt+response) "
        "tokens each, instead of micro_batch_size rows (0: off)",
    )
    gradient_checkpointing: bool = doc(False, "recompute activations in backward")
    lr_scheduler: str = doc(
        "constant",
        "learning-rate schedule (DeepSpeed's scheduler) over all optimizer steps of the run: "
        "constant, linear (decay to 0) or cosine (decay to lr * lr_min_ratio)",
    )
    lr_warmup_steps: int = doc(
        0, "optimizer steps of linear warm-up from 0 to lr before the schedule (0: none)"
    )
    lr_min_ratio: float = doc(0.0, "cosine: the lr at the end of the run, as a share of lr")


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the policy: only they are trained."""

    rank: int = doc(0, "adapter rank r (0: off, full fine-tuning)")
    alpha: float = doc(16.0, "scaling numerator: updates are scaled by alpha / rank")
    dropout: float = doc(0.0, "dropout on the adapter's input")
    target_modules: list[str] = doc(
        [], "module names to adapt, e.g. [q_proj, v_proj] ([]: every linear layer but the head)"
    )


@dataclass
class LearnerConfig(DeepSpeedRole):
    mini_batch_size: int = doc(0, "sequences per optimizer step, all ranks (0: the whole batch)")
    update_epochs: int = doc(1, "passes over each batch (the critic follows the same schedule)")
    max_skipped_steps: int = doc(
        3, "end the run after this many optimizer steps in a row skipped as non-finite (0: never)"
    )
    lora: LoraSpec = doc(LoraSpec(), "LoRA adapters instead of full fine-tuning (rank > 0)")


@dataclass
class CriticConfig(DeepSpeedRole):
    """The value model; its mini-batches and epochs follow the learner's."""

    path: str | None = doc(None, "value model init: null: the policy's path (a new value head)")
    lr: float = doc(5e-5, "AdamW learning rate of the critic")
    value_clip: float | None = doc(0.2, "clip the value update around the old values (null: off)")


@dataclass
class ReferenceConfig:
    resources: Resources = doc(Resources(), "for the reference actor")
    placement: Placement = doc(Placement(), "where the reference actor goes")
    actor_class: str | None = doc(None, "module:Class to run instead of the built-in reference")
    micro_batch_size: int = doc(16, "sequences per forward pass")
    logprob_chunk_size: int = doc(
        512, "log-probs computed for this many response tokens at a time (0: all at once)"
    )


@dataclass
class TrainerConfig:
    steps: int = doc(100, "training steps (one batch of prompts each)")
    eval_every: int = doc(10, "evaluate every N steps (0: only at start and end)")
    save_every: int = doc(
        0,
        "save a resumable checkpoint every N steps in output_dir/checkpoints/step_N "
        "(0: only the final model)",
    )
    keep_checkpoints: int = doc(2, "keep the last N checkpoints (0: keep all)")
    resume: str = doc(
        "none",
        "none: start a new run (output_dir must be empty or absent); auto: continue from "
        "the latest checkpoint in output_dir (a fresh start if there is none); or the path "
        "of a checkpoint (checkpoints/step_N) or of a run's output_dir",
    )
    output_dir: str = doc("runs/demo", "metrics.jsonl, TensorBoard logs, checkpoints, final/")
    save_merged: bool = doc(
        False, "with learner.lora: also write final/merged, the adapters merged into the model"
    )
    loggers: list[str] = doc(
        ["jsonl", "tensorboard"],
        "where metrics go: jsonl (metrics.jsonl), tensorboard, wandb, mlflow, console "
        "(a line per step); on the command line trainer.loggers=[jsonl,wandb]",
    )
    tensorboard: bool = doc(True, "deprecated: false drops tensorboard from trainer.loggers")
    log_completions: int = doc(
        0,
        "write this many of each step's samples (prompt, completion, rewards) to "
        "completions.jsonl and to the tensorboard / wandb / mlflow loggers (0: none)",
    )
    project: str = doc("rlalign-ray", "wandb project / mlflow experiment name")
    run_name: str | None = doc(None, "wandb / mlflow run name; null: output_dir's folder name")
    mlflow_tracking_uri: str | None = doc(
        None, "mlflow tracking URI; null: MLFLOW_TRACKING_URI, else output_dir/mlruns (files)"
    )
    eval_n_samples: int = doc(
        1,
        "samples per eval prompt at rollout.eval_temperature: eval/pass@k (unbiased) for k = "
        "1, 2, 4, ... n and eval/mean@n",
    )
    eval_pass_threshold: float = doc(
        1.0, "an eval sample counts as correct (pass@k) when its total reward is >= this"
    )
    progress_bar: bool = doc(True, "show a progress bar")
    max_staleness: int = doc(
        0,
        "pipelining: generation runs up to this many weight versions ahead of the learner "
        "(0: synchronous)",
    )
    sample_log: bool = doc(
        False,
        "write output_dir/samples.jsonl: one line per trained sample (step, prompt_index, "
        "sample_index, version, generator), an exactly-once ledger",
    )


@dataclass
class EnvConfig:
    """Multi-turn rollouts: each sample is an episode of an environment (``rlalign_ray.envs``)."""

    path: str | None = doc(None, "module:Class of an envs.Env subclass (null: single-turn)")
    kwargs: dict[str, Any] = doc({}, "keyword arguments for the environment class")
    max_turns: int = doc(4, "actions per episode at most; episodes cut there are truncated")
    stop: list[str] = doc([], "strings that end an action (besides EOS), kept in the action")
    reward: str = doc(
        "sum", "per-turn env rewards: sum, last, or rewards-only (only reward.rewards count)"
    )
    timeout_s: float = doc(60.0, "fail if one reset/step call takes longer (0: no limit)")
    max_context_tokens: int = doc(
        0, "end an episode (truncated) before its context exceeds this (0: the model's limit)"
    )
    num_actors: int = doc(0, "0: environments run inside the generators; >0: a pool of actors")
    resources: Resources = doc(Resources(num_cpus=0.5), "per environment actor")
    placement: Placement = doc(Placement(), "where the environment actors go")


@dataclass
class Config:
    run: RunConfig = doc(RunConfig(), "cluster and seeds")
    model: ModelConfig = doc(ModelConfig(), "policy and reference models")
    data: DataConfig = doc(DataConfig(), "prompt datasets")
    rollout: RolloutConfig = doc(RolloutConfig(), "generator pool and sampling")
    reward: RewardConfig = doc(RewardConfig(), "reward pool")
    algorithm: AlgorithmConfig = doc(AlgorithmConfig(), "RL algorithm")
    learner: LearnerConfig = doc(LearnerConfig(), "DeepSpeed learner group")
    reference: ReferenceConfig = doc(ReferenceConfig(), "reference actor for the KL term")
    critic: CriticConfig = doc(CriticConfig(), "value model group (ppo only)")
    sync: SyncConfig = doc(SyncConfig(), "weight sync from the learner to the generators")
    trainer: TrainerConfig = doc(TrainerConfig(), "the driver loop")
    env: EnvConfig = doc(EnvConfig(), "environments for multi-turn rollouts (env.path)")

    # ---- derived values, computed once -------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Sequences per step: prompts_per_step * n_samples."""
        return self.rollout.prompts_per_step * self.rollout.n_samples

    @property
    def mini_batch_size(self) -> int:
        return self.learner.mini_batch_size or self.batch_size

    @property
    def generator_dtype(self) -> str:
        """The dtype generators hold (and weights travel in)."""
        return self.rollout.dtype or self.model.dtype

    @property
    def behaviour_is_cap(self) -> float:
        """``algorithm.behaviour_is_cap`` resolved: pipelined training corrects for stale
        samples (AReaL's decoupled objective) unless told otherwise."""
        cap = self.algorithm.behaviour_is_cap
        return cap if cap is not None else (2.0 if self.trainer.max_staleness > 0 else 0.0)

    @property
    def needs_reference(self) -> bool:
        return self.algorithm.kl_coef > 0

    @property
    def needs_critic(self) -> bool:
        from rlalign_ray.algorithms import ADVANTAGE_ESTIMATORS

        est = ADVANTAGE_ESTIMATORS.get(self.algorithm.name)
        return bool(est and est.needs_critic)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> typed tree
# --------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, apply ``a.b=value`` overrides, build and validate the tree."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    errors: list[str] = []
    for item in overrides or []:
        _apply_override(raw, item, errors)
    cfg = _build(Config, raw, "", errors)
    if errors:
        raise ConfigError(errors)
    errors = validate(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config; ``base: other.yaml`` (relative to this file) is read first and this
    file's keys override it, section by section."""
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    if p.resolve() in seen:
        raise ConfigError([f"{p}: 'base' files include each other in a loop"])
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of sections"])
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(p.parent / str(base), seen + (p.resolve(),)), raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (the Python API)."""
    errors: list[str] = []
    cfg = _build(Config, _copy(raw), "", errors)
    errors += validate(cfg) if not errors else []
    if errors:
        raise ConfigError(errors)
    return cfg


def _apply_override(raw: dict[str, Any], item: str, errors: list[str]) -> None:
    if "=" not in item:
        errors.append(f"override {item!r}: write it as key.path=value, e.g. trainer.steps=20")
        return
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            errors.append(f"override {item!r}: {part!r} is not a section")
            return
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
        return cls()
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            valid = ", ".join(types_)
            errors.append(f"{prefix}{key}: unknown key{hint} (valid keys: {valid})")
            continue
        kwargs[key] = _coerce(types_[key], value, f"{prefix}{key}", errors)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:  # e.g. str | dict[str, str]: a mapping goes to the dict member
            kind = typing.get_origin(a) or a
            if isinstance(kind, type) and kind in (dict, list) and isinstance(value, kind):
                return _coerce(a, value, key, errors)
        return _coerce(inner[0], value, key, errors)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_coerce(args[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return {}
        return {str(k): _coerce(args[1], v, f"{key}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{key}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        errors.append(f"{key}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}: expected a string, got {value!r}")
        return ""
    return value


# --------------------------------------------------------------------------------------
# Validation: impossible combinations, each error naming the key and the fix
# --------------------------------------------------------------------------------------


def validate(cfg: Config) -> list[str]:
    from rlalign_ray.algorithms import ADVANTAGE_ESTIMATORS, AGGREGATION_MODES, KL_KINDS

    e: list[str] = []
    r, a, lr, t = cfg.rollout, cfg.algorithm, cfg.learner, cfg.trainer
    _positive(e, "rollout.prompts_per_step", r.prompts_per_step)
    _positive(e, "rollout.n_samples", r.n_samples)
    _positive(e, "rollout.max_new_tokens", r.max_new_tokens)
    _positive(e, "rollout.num_actors", r.num_actors)
    _positive(e, "rollout.micro_batch_size", r.micro_batch_size)
    _positive(e, "reward.num_actors", cfg.reward.num_actors)
    _positive(e, "learner.world_size", lr.world_size)
    _positive(e, "learner.micro_batch_size", lr.micro_batch_size)
    _positive(e, "learner.update_epochs", lr.update_epochs)
    _positive(e, "learner.max_skipped_steps", lr.max_skipped_steps, allow_zero=True)
    _positive(e, "rollout.timeout_s", r.timeout_s)
    _positive(e, "trainer.steps", t.steps, allow_zero=True)
    _positive(e, "trainer.max_staleness", t.max_staleness, allow_zero=True)
    _positive(e, "rollout.chunk_size", r.chunk_size, allow_zero=True)
    _positive(e, "rollout.dispatch_group", r.dispatch_group, allow_zero=True)
    _positive(e, "run.max_actor_restarts", cfg.run.max_actor_restarts, allow_zero=True)
    _positive(e, "run.max_learner_restarts", cfg.run.max_learner_restarts, allow_zero=True)
    _positive(e, "run.driver_threads", cfg.run.driver_threads, allow_zero=True)
    if t.max_staleness > 0:
        if a.use_behaviour_logprobs:
            e.append(
                "algorithm.use_behaviour_logprobs: pipelined training (trainer.max_staleness > "
                "0) needs the learner's own old log-probs to correct for stale samples; set "
                "it to false"
            )
        if r.enable_sleep_mode:
            e.append(
                "rollout.enable_sleep_mode: generators cannot sleep while the learner trains "
                "in pipelined training (trainer.max_staleness > 0); turn one of them off"
            )
    if a.behaviour_is_cap is not None and a.behaviour_is_cap < 0:
        e.append(f"algorithm.behaviour_is_cap: must be >= 0 (0: off), got {a.behaviour_is_cap}")
    if r.temperature <= 0:
        e.append(
            "rollout.temperature: must be > 0 for sampling (use eval_temperature=0 for greedy)"
        )
    if not 0 < r.top_p <= 1:
        e.append(f"rollout.top_p: must be in (0, 1], got {r.top_p}")
    if r.backend not in ("hf", "vllm"):
        e.append(f"rollout.backend: unknown backend {r.backend!r}; available: hf, vllm")
    if r.dtype is not None and r.dtype not in ("float32", "bfloat16", "float16"):
        e.append(f"rollout.dtype: use float32, bfloat16, float16 or null, got {r.dtype!r}")
    _positive(e, "rollout.tensor_parallel_size", r.tensor_parallel_size)
    _check_vllm(cfg, e)
    if cfg.sync.transport not in TRANSPORTS:
        e.append(
            "sync.transport: use auto, collective, cuda_ipc, shared_memory or object_store, got "
            f"{cfg.sync.transport!r}"
        )
    if cfg.sync.backend not in ("auto", "gloo", "nccl"):
        e.append(f"sync.backend: use auto, gloo or nccl, got {cfg.sync.backend!r}")
    _positive(e, "sync.bucket_mb", cfg.sync.bucket_mb)
    if a.name not in ADVANTAGE_ESTIMATORS:
        e.append(
            f"algorithm.name: unknown {a.name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    else:
        est = ADVANTAGE_ESTIMATORS[a.name]
        if est.needs_groups and r.n_samples < 2:
            e.append(
                f"rollout.n_samples: {a.name} compares samples within a prompt's group, so it "
                f"needs n_samples >= 2 (got {r.n_samples})"
            )
        if est.needs_critic:
            _positive(e, "critic.world_size", cfg.critic.world_size)
            _positive(e, "critic.micro_batch_size", cfg.critic.micro_batch_size)
            unit = cfg.critic.world_size * cfg.critic.micro_batch_size
            if cfg.mini_batch_size % unit:
                e.append(
                    f"critic.micro_batch_size: mini-batches of {cfg.mini_batch_size} must "
                    f"split over critic.world_size={cfg.critic.world_size} ranks in "
                    f"micro-batches of {cfg.critic.micro_batch_size}"
                )
    if a.kl_estimator not in KL_KINDS:
        e.append(f"algorithm.kl_estimator: unknown {a.kl_estimator!r}; use one of {list(KL_KINDS)}")
    if a.dual_clip is not None and a.dual_clip <= 1:
        e.append(f"algorithm.dual_clip: must be > 1 (e.g. 3.0) or null, got {a.dual_clip}")
    if a.kl_in_reward and a.name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        e.append(
            f"algorithm.kl_in_reward: {a.name} scores whole sequences; use the KL loss "
            "term (kl_in_reward: false), or ppo / reinforce_pp"
        )
    if a.overlong_buffer >= cfg.rollout.max_new_tokens:
        e.append(
            f"algorithm.overlong_buffer: must be < rollout.max_new_tokens "
            f"({cfg.rollout.max_new_tokens}), got {a.overlong_buffer}"
        )
    if a.kl_coef < 0:
        e.append(f"algorithm.kl_coef: must be >= 0, got {a.kl_coef}")
    if a.loss_agg not in AGGREGATION_MODES:
        e.append(
            f"algorithm.loss_agg: unknown {a.loss_agg!r}; use one of {list(AGGREGATION_MODES)}"
        )
    if lr.zero_stage not in (0, 1, 2, 3):
        e.append(f"learner.zero_stage: must be 0, 1, 2 or 3, got {lr.zero_stage}")
    if lr.backend not in ("auto", "gloo", "nccl"):
        e.append(f"learner.backend: use auto, gloo or nccl, got {lr.backend!r}")
    longest = cfg.data.max_prompt_tokens + r.max_new_tokens
    for role in ("learner", "critic"):
        sec = getattr(cfg, role)
        if sec.optimizer not in ("adamw", "sgd"):
            e.append(f"{role}.optimizer: use adamw or sgd, got {sec.optimizer!r}")
        _positive(e, f"{role}.logprob_chunk_size", sec.logprob_chunk_size, allow_zero=True)
        budget = sec.max_tokens_per_micro_batch
        if budget < 0 or 0 < budget < longest:
            e.append(
                f"{role}.max_tokens_per_micro_batch: must be 0 (off) or hold one full row of "
                f"data.max_prompt_tokens + rollout.max_new_tokens = {longest} tokens, got "
                f"{budget}; raise it or lower those limits"
            )
    _positive(e, "reference.logprob_chunk_size", cfg.reference.logprob_chunk_size, True)
    if len(lr.betas) != 2:
        e.append(f"learner.betas: needs two numbers, got {lr.betas}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        e.append(f"model.dtype: use float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    for role in ("learner", "critic") if cfg.needs_critic else ("learner",):
        if cfg.model.dtype != "float32" and not getattr(cfg, role).bf16:
            e.append(
                f"model.dtype: {cfg.model.dtype} weights with {role}.bf16: false would run "
                f"the optimizer on {cfg.model.dtype} weights with no float32 master copy "
                f"(updates lost to rounding); set {role}.bf16: true, or model.dtype: float32"
            )
    _check_batches(cfg, e)
    _check_rewards(cfg, e)
    _check_lora(cfg, e)
    if any(not isinstance(s, str) or not s for s in r.stop):
        e.append(f"rollout.stop: stop strings must be non-empty, got {r.stop}")
    if not cfg.data.train:
        e.append("data.train: give a JSONL or Parquet file, or a save_to_disk folder, of prompts")
    if cfg.data.truncation not in ("error", "left", "drop"):
        e.append(f"data.truncation: use one of error, left, drop, got {cfg.data.truncation!r}")
    _check_ecosystem(cfg, e)
    _check_gpu_layout(cfg, e)
    _check_sampling_math(cfg, e)
    if t.eval_every < 0 or t.save_every < 0:
        e.append("trainer.eval_every / trainer.save_every: must be >= 0")
    _positive(e, "trainer.keep_checkpoints", t.keep_checkpoints, allow_zero=True)
    if t.resume not in ("none", "auto") and not Path(t.resume).exists():
        e.append(
            f"trainer.resume: {t.resume!r} is neither none, auto nor an existing checkpoint "
            "or run folder"
        )
    return e


LOGGERS = {
    "jsonl": None,
    "tensorboard": "tensorboard",
    "console": None,
    "wandb": "wandb",
    "mlflow": "mlflow",
}  # logger -> the module it imports
LR_SCHEDULERS = ("constant", "linear", "cosine")


def _check_ecosystem(cfg: Config, e: list[str]) -> None:
    """Loggers, completion logging, evaluation sampling and learning-rate schedules."""
    import importlib.util

    t = cfg.trainer
    for name in t.loggers:
        if name not in LOGGERS:
            e.append(f"trainer.loggers: unknown logger {name!r}; use any of {', '.join(LOGGERS)}")
        elif LOGGERS[name] and importlib.util.find_spec(LOGGERS[name]) is None:
            e.append(
                f"trainer.loggers: {name} is not installed; pip install 'rlalign-ray[{name}]' "
                f"(or leave {name} out of trainer.loggers)"
            )
    _positive(e, "trainer.log_completions", t.log_completions, allow_zero=True)
    _positive(e, "trainer.eval_n_samples", t.eval_n_samples)
    if t.eval_n_samples > 1 and cfg.rollout.eval_temperature <= 0:
        e.append(
            f"rollout.eval_temperature: trainer.eval_n_samples={t.eval_n_samples} samples per "
            "prompt at temperature 0 (greedy) are all the same; set eval_temperature > 0 "
            "(e.g. 1.0) or eval_n_samples: 1"
        )
    if isinstance(cfg.data.eval, dict):
        for name in cfg.data.eval:
            if not name or "/" in name:
                e.append(f"data.eval.{name}: an eval set's name must be non-empty without '/'")
    for role in ("learner", "critic"):
        sec = getattr(cfg, role)
        if sec.lr_scheduler not in LR_SCHEDULERS:
            e.append(
                f"{role}.lr_scheduler: use one of {', '.join(LR_SCHEDULERS)}, "
                f"got {sec.lr_scheduler!r}"
            )
        _positive(e, f"{role}.lr_warmup_steps", sec.lr_warmup_steps, allow_zero=True)
        if not 0 <= sec.lr_min_ratio <= 1:
            e.append(f"{role}.lr_min_ratio: must be in [0, 1], got {sec.lr_min_ratio}")


def _check_gpu_layout(cfg: Config, e: list[str]) -> None:
    e += gpu_layout_problems(role_layout(cfg), cfg.sync)
    if cfg.sync.transport == "cuda_ipc" and (
        cfg.rollout.placement.colocate_with != "learner" or not cfg.rollout.resources.num_gpus
    ):
        e.append(
            "sync.transport: cuda_ipc hands each generator its learner rank's GPU memory, so "
            "every generator must share a learner rank's GPU (rollout.placement."
            "colocate_with: learner, rollout.resources.num_gpus > 0); use auto otherwise"
        )


def _check_sampling_math(cfg: Config, e: list[str]) -> None:
    """Combinations whose math is biased: truncated sampling with the generator's log-probs
    used as probabilities, and KL estimators placed where their gradient is wrong."""
    r, a = cfg.rollout, cfg.algorithm
    if r.top_p < 1 or r.top_k > 0:
        uses = []
        if a.use_behaviour_logprobs:
            uses.append("algorithm.use_behaviour_logprobs (the old log-probs of the ratio)")
        if a.kl_in_reward and (a.kl_coef > 0 or a.kl_target > 0):
            uses.append("algorithm.kl_in_reward (the in-reward KL)")
        if cfg.behaviour_is_cap > 0 and not a.use_behaviour_logprobs:
            uses.append(
                "algorithm.behaviour_is_cap (the importance weight; on by default when "
                "trainer.max_staleness > 0)"
            )
        if uses:
            e.append(
                f"rollout.top_p={r.top_p:g} / rollout.top_k={r.top_k}: the generators record "
                "log-probs of the truncated distribution they sample from, while the learner "
                "scores the full softmax; " + " and ".join(uses) + " would use the truncated "
                "ones as the policy's and bias the update. Sample with top_p: 1 and top_k: 0, "
                "or turn those off (use_behaviour_logprobs: false, kl_in_reward: false, "
                "behaviour_is_cap: 0)"
            )
    kl_on = a.kl_coef > 0 or a.kl_target > 0
    if kl_on and not a.kl_in_reward and a.kl_estimator == "k1":
        e.append(
            "algorithm.kl_estimator: k1 as a loss term has zero expected gradient on-policy "
            "(its gradient is the score function, whose mean is 0), so it does not pull the "
            "policy towards the reference; use k3 (GRPO's) or k2 (its gradient is the KL's) "
            "as a loss term, or k1 with kl_in_reward: true"
        )


def _positive(e: list[str], key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        e.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_vllm(cfg: Config, e: list[str]) -> None:
    import importlib.util

    r = cfg.rollout
    if r.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        e.append(
            "rollout.backend: vllm is not installed; run `bash launch/install_vllm.sh` "
            "(or use rollout.backend: hf)"
        )
    if r.enable_sleep_mode and r.backend != "vllm":
        e.append(
            "rollout.enable_sleep_mode: only the vllm backend sleeps; set rollout.backend: vllm"
        )
    if r.tensor_parallel_size > 1 and r.resources.num_gpus < r.tensor_parallel_size:
        e.append(
            f"rollout.resources.num_gpus: each generator runs a vLLM engine over "
            f"rollout.tensor_parallel_size={r.tensor_parallel_size} GPUs; ask for at least "
            f"that many (got {r.resources.num_gpus:g})"
        )
    if not 0 < r.gpu_memory_utilization <= 1:
        e.append(
            f"rollout.gpu_memory_utilization: must be in (0, 1], got {r.gpu_memory_utilization}"
        )
    _positive(e, "rollout.kv_cache_gb", r.kv_cache_gb)
    _positive(e, "rollout.max_model_len", r.max_model_len, allow_zero=True)


def _check_batches(cfg: Config, e: list[str]) -> None:
    lr = cfg.learner
    batch, mini = cfg.batch_size, cfg.mini_batch_size
    per_rank_unit = lr.world_size * lr.micro_batch_size
    if mini > batch:
        e.append(
            f"learner.mini_batch_size: {mini} is larger than the batch "
            f"(rollout.prompts_per_step * rollout.n_samples = {batch}); lower it"
        )
    elif batch % mini:
        e.append(
            f"learner.mini_batch_size: the batch of {batch} sequences "
            f"(prompts_per_step * n_samples) must split into mini-batches of {mini}; "
            f"pick a divisor of {batch}"
        )
    if mini % cfg.rollout.n_samples and cfg.algorithm.name != "ppo":
        e.append(
            f"learner.mini_batch_size: {mini} should hold whole groups of "
            f"rollout.n_samples={cfg.rollout.n_samples}; use a multiple of it"
        )
    if mini % per_rank_unit:
        e.append(
            f"learner.micro_batch_size: each mini-batch of {mini} sequences is split over "
            f"learner.world_size={lr.world_size} ranks in micro-batches of "
            f"{lr.micro_batch_size}; {mini} is not divisible by {per_rank_unit}. "
            f"Make mini_batch_size a multiple of world_size * micro_batch_size"
        )


def _check_lora(cfg: Config, e: list[str]) -> None:
    import importlib.util

    lo = cfg.learner.lora
    _positive(e, "learner.lora.rank", lo.rank, allow_zero=True)
    if cfg.trainer.save_merged and lo.rank == 0:
        e.append("trainer.save_merged: only with LoRA (learner.lora.rank > 0); final/ is merged")
    if lo.rank == 0:
        return
    _positive(e, "learner.lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        e.append(f"learner.lora.dropout: must be in [0, 1), got {lo.dropout}")
    if importlib.util.find_spec("peft") is None:
        e.append("learner.lora: needs peft; pip install -e '.[lora]' (or set learner.lora.rank: 0)")


NONFINITE_MODES = ("error", "zero", "drop_group")


def _check_rewards(cfg: Config, e: list[str]) -> None:
    _positive(e, "reward.timeout_s", cfg.reward.timeout_s, allow_zero=True)
    if cfg.reward.on_nonfinite not in NONFINITE_MODES:
        e.append(
            f"reward.on_nonfinite: use one of {', '.join(NONFINITE_MODES)}, "
            f"got {cfg.reward.on_nonfinite!r}"
        )
    if cfg.env.path:
        _check_env(cfg, e)
    if not cfg.reward.rewards and not (cfg.env.path and cfg.env.reward != "rewards-only"):
        e.append(
            "reward.rewards: give at least one reward, e.g. "
            "[{type: function, path: 'rlalign_ray.rewards.builtin:arithmetic_exact'}]"
        )
    for i, spec in enumerate(cfg.reward.rewards):
        key = f"reward.rewards[{i}]"
        if spec.type not in ("function", "model", "embedding", "http"):
            e.append(f"{key}.type: use function, model, embedding or http, got {spec.type!r}")
        if spec.type == "http":
            if not spec.url.startswith(("http://", "https://")):
                e.append(
                    f"{key}.url: an http reward needs an http:// or https:// URL, got {spec.url!r}"
                )
            _positive(e, f"{key}.timeout_s", spec.timeout_s)
            _positive(e, f"{key}.retries", spec.retries, allow_zero=True)
            _positive(e, f"{key}.batch_size", spec.batch_size)
            continue
        if not spec.path:
            e.append(f"{key}.path: required (module:function or a model path)")
        elif spec.type == "function" and ":" not in spec.path:
            e.append(f"{key}.path: a function reward is 'module:function', got {spec.path!r}")


ENV_REWARD_MODES = ("sum", "last", "rewards-only")


def _check_env(cfg: Config, e: list[str]) -> None:
    v = cfg.env
    if ":" not in v.path:
        e.append(f"env.path: write it as module:Class, got {v.path!r}")
    _positive(e, "env.max_turns", v.max_turns)
    _positive(e, "env.timeout_s", v.timeout_s, allow_zero=True)
    _positive(e, "env.num_actors", v.num_actors, allow_zero=True)
    _positive(e, "env.max_context_tokens", v.max_context_tokens, allow_zero=True)
    if v.reward not in ENV_REWARD_MODES:
        e.append(f"env.reward: use one of {', '.join(ENV_REWARD_MODES)}, got {v.reward!r}")
    if cfg.algorithm.overlong_buffer:
        e.append(
            "algorithm.overlong_buffer: counts a whole multi-turn trajectory against "
            "rollout.max_new_tokens (a per-turn limit with env.path); set it to 0"
        )
