"""The training side: algorithm, the learner and critic groups, reference and trainer."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from rlalign_ray.config.fields import DistBackend, Placement, Resources, doc

# options read from the algorithms' registries when the config is checked (this module
# does not import torch): config.fields.registry_options
ESTIMATORS = "rlalign_ray.algorithms.registry:ADVANTAGE_ESTIMATORS"
LOSSES = "rlalign_ray.algorithms.losses:POLICY_LOSSES"
KL_ESTIMATORS = "rlalign_ray.algorithms.kl:KL_KINDS"
LOSS_AGGS = "rlalign_ray.algorithms.utils:AGGREGATION_MODES"
Optimizer = Literal["adamw", "sgd"]
LrScheduler = Literal["constant", "linear", "cosine"]
LR_SCHEDULERS = typing.get_args(LrScheduler)


@dataclass
class AlgorithmConfig:
    """The objective (rlalign_ray/algorithms/objective.py; docs/guides/objectives.md)."""

    name: str = doc(
        "grpo", "advantage estimator, or a user's module:function (an estimator)", ESTIMATORS
    )
    policy_loss: str = doc(
        "ppo_clip",
        "the surrogate: ppo_clip (PPO), gspo (sequence-level ratio), cispo (clipped IS "
        "weight on REINFORCE), or a user's module:function (a policy loss)",
        LOSSES,
    )
    kl_coef: float = doc(0.0, "KL coefficient (0: no reference model is started)")
    kl_estimator: str | None = doc(
        None,
        "KL estimator: k1, k2, k3 or abs (null: k1 in the reward, k3 as a loss term; only k1 "
        "is right in the reward)",
        KL_ESTIMATORS,
    )
    kl_in_reward: bool = doc(False, "KL as a per-token reward penalty (else a loss term)")
    kl_target: float = doc(0.0, "adaptive KL controller target (0: fixed kl_coef)")
    kl_horizon: int = doc(10000, "adaptive KL controller horizon in samples")
    clip_low: float | None = doc(
        None, "ratio >= 1 - clip_low (null: the loss's: ppo_clip 0.2, gspo 3e-4, cispo 1.0)"
    )
    clip_high: float | None = doc(
        None,
        "ratio <= 1 + clip_high (null: the loss's: ppo_clip 0.2, gspo 4e-4, cispo 0.28; "
        "DAPO clip-higher: 0.28)",
    )
    dual_clip: float | None = doc(
        None, "ppo_clip: dual-clip constant c > 1 for negative advantages"
    )
    loss_agg: str | None = doc(
        None,
        "loss normaliser (null: the loss's: seq-mean-token-mean for gspo, else token-mean)",
        LOSS_AGGS,
    )
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
    behaviour_seq_mask: list[float] = doc(
        [],
        "[lo, hi]: drop from the loss the rows whose sequence ratio exp(mean_t log "
        "pi_learner/pi_generator) leaves [lo, hi], e.g. [0.5, 2.0] (train/seq_masked_frac; "
        "[]: off)",
    )


@dataclass
class DeepSpeedRole:
    """A data-parallel DeepSpeed group (the policy learner, the critic)."""

    world_size: int = doc(1, "ranks (one Ray actor per rank, data parallel)")
    resources: Resources = doc(Resources(), "per rank")
    placement: Placement = doc(Placement(), "where the ranks go")
    actor_class: str | None = doc(None, "module:Class to run instead of the built-in rank")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage 0-3")
    backend: DistBackend = doc("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU)")
    optimizer: Optimizer = doc(
        "adamw", "adamw, or sgd (plain gradient steps: for exactness checks)"
    )
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
    lr_scheduler: LrScheduler = doc(
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
        "or URI of a checkpoint (checkpoints/step_N) or of a run's output_dir",
    )
    output_dir: str = doc(
        "runs/demo",
        "metrics.jsonl, TensorBoard logs, checkpoints, final/: a local folder (shared by every "
        "node that runs learner or critic ranks) or a URI: s3://bucket/run, gs://..., any "
        "fsspec filesystem",
    )
    storage_options: dict[str, Any] = doc(
        {},
        "fsspec options for a URI output_dir, e.g. {endpoint_url: http://HOST:9000} for an "
        "S3-compatible store; credentials: the backend's environment variables on every node",
    )
    staging_dir: str | None = doc(
        None,
        "with a URI output_dir: the node-local folder each process writes its files in before "
        "uploading them, and downloads checkpoints to (null: the system temp folder)",
    )
    log_sync_s: float = doc(
        30.0,
        "with a URI output_dir: upload the changed logs (metrics, completions, samples, "
        "TensorBoard) after a step at most this often (0: every step); always after a "
        "checkpoint and at the end",
    )
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
    max_staleness: int | str = doc(
        0,
        "pipelining: generation runs up to this many weight versions ahead of the learner "
        "(0: synchronous); auto: a bound between 0 and max_staleness_cap that steers "
        "itself by the off-policy price (docs/guides/async.md)",
    )
    max_staleness_cap: int = doc(4, "max_staleness: auto never lets the bound above this")
    staleness_kl_high: float = doc(
        0.01,
        "max_staleness: auto lowers the bound when train/mismatch_kl (behaviour vs learner, "
        "k3) passes this; it rises after staleness_patience steps under a quarter of it",
    )
    staleness_clip_high: float = doc(
        0.02,
        "max_staleness: auto lowers the bound when train/behaviour_is_clipfrac (share of "
        "tokens whose importance weight hits behaviour_is_cap) passes this",
    )
    staleness_patience: int = doc(
        3, "max_staleness: auto raises the bound after this many steps in a row of small price"
    )
    sample_log: bool = doc(
        False,
        "write output_dir/samples.jsonl: one line per trained sample (step, prompt_index, "
        "sample_index, version, generator), an exactly-once ledger",
    )
