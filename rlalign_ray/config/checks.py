"""Validation of a built tree: impossible values and combinations, each error naming the
key and the fix. One check per section; ``validate`` runs them all and returns every
problem (the loader raises them together as one ``ConfigError``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlalign_ray.config.checks_algorithm import check_algorithm, check_sampling_math
from rlalign_ray.config.fields import field_types, literal_choices, registry_options
from rlalign_ray.config.pools import check_pools
from rlalign_ray.errors import ConfigError
from rlalign_ray.roles import DEEPSPEED_ROLES, gpu_layout_problems, role_layout

if TYPE_CHECKING:
    from rlalign_ray.config.training import TrainerConfig
    from rlalign_ray.config.tree import Config

LOGGERS = {
    "jsonl": None,
    "tensorboard": "tensorboard",
    "console": None,
    "wandb": "wandb",
    "mlflow": "mlflow",
}  # logger -> the module it imports
OPTIONAL_LOGGERS = ("wandb", "mlflow")  # pyproject extras of the same name; the rest are core


def validate(cfg: Config) -> list[str]:
    """Every problem of ``cfg``, section by section (an empty list: the config is sound)."""
    e: list[str] = []
    for check in CHECKS:
        try:
            check(cfg, e)
        except (ArithmeticError, TypeError, ValueError) as err:  # values no check foresaw
            section = check.__name__.removeprefix("check_").removeprefix("_check_")
            e.append(
                f"{section}: its values could not be checked together ({type(err).__name__}: "
                f"{err}); look for a zero, negative or mistyped value in that section"
            )
    return e


def _positive(e: list[str], key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        e.append(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_options(cfg: Config, e: list[str]) -> None:
    """Every option field (typed ``Literal[...]``, or ``doc(..., options=...)``: a registry's
    names, or a user's ``module:function`` that resolves) holds one of its values."""
    _check_options(cfg, "", e)


def _check_options(node: Any, prefix: str, e: list[str]) -> None:
    types_ = field_types(type(node))
    for f in dataclasses.fields(node):
        name, tp = f.name, types_[f.name]
        value, key = getattr(node, name), prefix + name
        if dataclasses.is_dataclass(value):
            _check_options(value, key + ".", e)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_options(item, f"{key}[{i}].", e)
        allowed, nullable = literal_choices(tp)
        if f.metadata.get("options"):
            _check_registered(f, key, value, type(None) in typing.get_args(tp), e)
        elif allowed and value not in allowed and not (nullable and value is None):
            also = " or null" if nullable else ""
            e.append(f"{key}: use one of {', '.join(map(str, allowed))}{also}; got {value!r}")


def _check_registered(
    f: dataclasses.Field, key: str, value: Any, nullable: bool, e: list[str]
) -> None:
    """A registry's option: one of its names, null where the field allows it, or (for a
    registry of functions) a user's ``module:function`` that imports and fits."""
    names, registry = registry_options(f)
    if (nullable and value is None) or value in names:
        return
    if registry is not None and isinstance(value, str) and ":" in value:
        try:
            registry.resolve(value)
        except ValueError as err:
            e.append(f"{key}: {err}")
        return
    also = (", or a module:function" if registry is not None else "") + (
        " or null" if nullable else ""
    )
    e.append(f"{key}: use one of {', '.join(names)}{also}; got {value!r}")


def check_run(cfg: Config, e: list[str]) -> None:
    _positive(e, "run.max_actor_restarts", cfg.run.max_actor_restarts, allow_zero=True)
    _positive(e, "run.max_learner_restarts", cfg.run.max_learner_restarts, allow_zero=True)
    _positive(e, "run.driver_threads", cfg.run.driver_threads, allow_zero=True)
    _positive(e, "run.placement_timeout_s", cfg.run.placement_timeout_s)
    _positive(e, "run.call_timeout_s", cfg.run.call_timeout_s)


def check_model(cfg: Config, e: list[str]) -> None:
    for role in DEEPSPEED_ROLES if cfg.needs_critic else ("learner",):
        if cfg.model.dtype != "float32" and not getattr(cfg, role).bf16:
            e.append(
                f"model.dtype: {cfg.model.dtype} weights with {role}.bf16: false would run "
                f"the optimizer on {cfg.model.dtype} weights with no float32 master copy "
                f"(updates lost to rounding); set {role}.bf16: true, or model.dtype: float32"
            )


def check_data(cfg: Config, e: list[str]) -> None:
    _positive(e, "data.max_prompt_tokens", cfg.data.max_prompt_tokens)
    _positive(e, "data.eval_limit", cfg.data.eval_limit, allow_zero=True)
    if not cfg.data.train:
        e.append("data.train: give a JSONL or Parquet file, or a save_to_disk folder, of prompts")
    if isinstance(cfg.data.eval, dict):
        for name in cfg.data.eval:
            if not name or "/" in name:
                e.append(f"data.eval.{name}: an eval set's name must be non-empty without '/'")


def check_rollout(cfg: Config, e: list[str]) -> None:
    r = cfg.rollout
    for key in ("prompts_per_step", "n_samples", "max_new_tokens", "num_actors"):
        _positive(e, f"rollout.{key}", getattr(r, key))
    _positive(e, "rollout.micro_batch_size", r.micro_batch_size)
    _positive(e, "rollout.timeout_s", r.timeout_s)
    _positive(e, "rollout.chunk_size", r.chunk_size, allow_zero=True)
    _positive(e, "rollout.dispatch_group", r.dispatch_group, allow_zero=True)
    if r.temperature <= 0:
        e.append(
            "rollout.temperature: must be > 0 for sampling (use eval_temperature=0 for greedy)"
        )
    if not 0 < r.top_p <= 1:
        e.append(f"rollout.top_p: must be in (0, 1], got {r.top_p}")
    _check_backend(cfg, e)
    _check_inflight(cfg, e)
    if any(not isinstance(s, str) or not s for s in r.stop):
        e.append(f"rollout.stop: stop strings must be non-empty, got {r.stop}")


def _check_inflight(cfg: Config, e: list[str]) -> None:
    """In-flight weight updates (``rollout.inflight_updates``) and what they need."""
    r = cfg.rollout
    if not r.inflight_updates:
        return
    if not cfg.pipelined:
        e.append(
            "rollout.inflight_updates: a synchronous run (trainer.max_staleness: 0) loads "
            "weights only while no generator samples; set trainer.max_staleness >= 1 (or "
            "auto) or turn inflight_updates off"
        )
    if r.dispatch_group > 0:
        e.append(
            "rollout.inflight_updates: dispatchers (rollout.dispatch_group > 0) load weights "
            "after their group's chunks; set rollout.dispatch_group: 0 or turn "
            "inflight_updates off"
        )


def _check_backend(cfg: Config, e: list[str]) -> None:
    """The backend's own keys, checked by its type (the backend registry: a torch-free
    module, read here rather than at load time since rollout/ is a room above the
    config's), and what its capabilities ask of the rest of the config."""
    from rlalign_ray.rollout.backends import backend_type, check_backend

    try:
        kind = backend_type(cfg.rollout.backend)
    except ConfigError as err:
        e += err.problems
        return
    e += check_backend(cfg.rollout, kind)
    if kind.sleeps(cfg.rollout) and cfg.pipelined:
        e.append(
            f"rollout.{kind.section or 'backend'}: {cfg.rollout.backend} generators cannot "
            "sleep while the learner trains in pipelined training (trainer.max_staleness > 0); "
            "turn one off"
        )
    if cfg.rollout.inflight_updates and not kind.capabilities.inflight_updates:
        e.append(
            f"rollout.inflight_updates: the {cfg.rollout.backend} backend cannot load weights "
            "between decode steps (its Capabilities say so); turn inflight_updates off"
        )


def check_sync(cfg: Config, e: list[str]) -> None:
    _positive(e, "sync.bucket_mb", cfg.sync.bucket_mb)
    _positive(e, "sync.timeout_s", cfg.sync.timeout_s)


def check_gpu_layout(cfg: Config, e: list[str]) -> None:
    kinds = {name: p.kind for name, p in cfg.pools.items()}
    e += gpu_layout_problems(role_layout(cfg), cfg.sync, kinds)
    if cfg.sync.transport == "cuda_ipc" and (
        cfg.rollout.placement.colocate_with != "learner" or not cfg.rollout.resources.num_gpus
    ):
        e.append(
            "sync.transport: cuda_ipc hands each generator its learner rank's GPU memory, so "
            "every generator must share a learner rank's GPU (rollout.placement."
            "colocate_with: learner, rollout.resources.num_gpus > 0); use auto otherwise"
        )


def check_env(cfg: Config, e: list[str]) -> None:
    v = cfg.env
    if not v.path:
        return
    if ":" not in v.path:
        e.append(f"env.path: write it as module:Class, got {v.path!r}")
    _positive(e, "env.max_turns", v.max_turns)
    _positive(e, "env.timeout_s", v.timeout_s, allow_zero=True)
    _positive(e, "env.num_actors", v.num_actors, allow_zero=True)
    _positive(e, "env.max_context_tokens", v.max_context_tokens, allow_zero=True)
    if cfg.algorithm.overlong_buffer:
        e.append(
            "algorithm.overlong_buffer: counts a whole multi-turn trajectory against "
            "rollout.max_new_tokens (a per-turn limit with env.path); set it to 0"
        )


def check_reward(cfg: Config, e: list[str]) -> None:
    """The pool's keys; each reward's own keys are checked by its type (the reward-type
    registry: a torch-free module, read here rather than at load time since rewards/ is
    a room above the config's)."""
    from rlalign_ray.rewards.types import check_reward_specs

    _positive(e, "reward.num_actors", cfg.reward.num_actors)
    _positive(e, "reward.timeout_s", cfg.reward.timeout_s, allow_zero=True)
    if not cfg.reward.rewards and not (cfg.env.path and cfg.env.reward != "rewards-only"):
        e.append(
            "reward.rewards: give at least one reward, e.g. "
            "[{type: function, path: 'rlalign_ray.rewards.builtin:arithmetic_exact'}]"
        )
    e += check_reward_specs(cfg.reward.rewards)


def check_learner(cfg: Config, e: list[str]) -> None:
    lr = cfg.learner
    _positive(e, "learner.world_size", lr.world_size)
    _positive(e, "learner.micro_batch_size", lr.micro_batch_size)
    _positive(e, "learner.update_epochs", lr.update_epochs)
    _positive(e, "learner.max_skipped_steps", lr.max_skipped_steps, allow_zero=True)
    if lr.zero_stage not in (0, 1, 2, 3):
        e.append(f"learner.zero_stage: must be 0, 1, 2 or 3, got {lr.zero_stage}")
    if len(lr.betas) != 2:
        e.append(f"learner.betas: needs two numbers, got {lr.betas}")
    for role in DEEPSPEED_ROLES:
        _check_optimizer(cfg, role, e)
    _positive(e, "learner.mini_batch_size", lr.mini_batch_size, allow_zero=True)
    sizes = (
        cfg.rollout.prompts_per_step,
        cfg.rollout.n_samples,
        lr.world_size,
        lr.micro_batch_size,
    )
    if min(sizes) > 0 and lr.mini_batch_size >= 0:  # else named above: nothing to split
        _check_batches(cfg, e)
    _check_lora(cfg, e)


def _check_optimizer(cfg: Config, role: str, e: list[str]) -> None:
    """A DeepSpeed group's schedule and memory knobs (learner and critic)."""
    sec = getattr(cfg, role)
    _positive(e, f"{role}.lr", sec.lr)
    _positive(e, f"{role}.grad_clip", sec.grad_clip, allow_zero=True)
    _positive(e, f"{role}.weight_decay", sec.weight_decay, allow_zero=True)
    _positive(e, f"{role}.logprob_chunk_size", sec.logprob_chunk_size, allow_zero=True)
    _check_budget(cfg, role, e)
    _positive(e, f"{role}.lr_warmup_steps", sec.lr_warmup_steps, allow_zero=True)
    if not 0 <= sec.lr_min_ratio <= 1:
        e.append(f"{role}.lr_min_ratio: must be in [0, 1], got {sec.lr_min_ratio}")


def _check_budget(cfg: Config, role: str, e: list[str]) -> None:
    """A token budget: packed rows longer than it run alone; padded ones must fit it."""
    sec = getattr(cfg, role)
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    budget = sec.max_tokens_per_micro_batch
    if budget < 0:
        e.append(f"{role}.max_tokens_per_micro_batch: must be >= 0 (0: off), got {budget}")
    elif 0 < budget < longest and not sec.packing:
        e.append(
            f"{role}.max_tokens_per_micro_batch: without {role}.packing it must be 0 (off) or "
            f"hold one full row of data.max_prompt_tokens + rollout.max_new_tokens = "
            f"{longest} tokens, got {budget}; raise it, lower those limits, or set "
            f"{role}.packing: true (a longer packed row runs alone)"
        )


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
    if mini % cfg.rollout.n_samples and not cfg.needs_critic:
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


def check_critic(cfg: Config, e: list[str]) -> None:
    """Only where the algorithm trains a critic (ppo)."""
    c = cfg.critic
    if not cfg.needs_critic:
        return
    _positive(e, "critic.world_size", c.world_size)
    _positive(e, "critic.micro_batch_size", c.micro_batch_size)
    unit = c.world_size * c.micro_batch_size
    if unit > 0 and cfg.mini_batch_size % unit:
        e.append(
            f"critic.micro_batch_size: mini-batches of {cfg.mini_batch_size} must "
            f"split over critic.world_size={c.world_size} ranks in "
            f"micro-batches of {c.micro_batch_size}"
        )


def check_reference(cfg: Config, e: list[str]) -> None:
    _positive(e, "reference.logprob_chunk_size", cfg.reference.logprob_chunk_size, True)
    _positive(e, "reference.micro_batch_size", cfg.reference.micro_batch_size)
    _check_budget(cfg, "reference", e)


def check_staleness(t: TrainerConfig, e: list[str]) -> None:
    """``trainer.max_staleness``: an integer >= 0 or auto (with its cap and thresholds)."""
    k = t.max_staleness
    if isinstance(k, str) and k != "auto":
        e.append(f"trainer.max_staleness: an integer >= 0 or auto, got {k!r}")
    elif isinstance(k, int):
        _positive(e, "trainer.max_staleness", k, allow_zero=True)
    if t.max_staleness_cap < 1:
        e.append(f"trainer.max_staleness_cap: must be >= 1, got {t.max_staleness_cap}")
    for key in ("staleness_kl_high", "staleness_clip_high", "staleness_patience"):
        _positive(e, f"trainer.{key}", getattr(t, key))


def check_trainer(cfg: Config, e: list[str]) -> None:
    t = cfg.trainer
    _positive(e, "trainer.steps", t.steps, allow_zero=True)
    check_staleness(t, e)
    if t.eval_every < 0 or t.save_every < 0:
        e.append("trainer.eval_every / trainer.save_every: must be >= 0")
    _positive(e, "trainer.keep_checkpoints", t.keep_checkpoints, allow_zero=True)
    _check_uri(e, "trainer.output_dir", t.output_dir)
    if t.resume not in ("none", "auto") and not _check_uri(e, "trainer.resume", t.resume):
        if not Path(t.resume.removeprefix("file://")).exists():
            e.append(
                f"trainer.resume: {t.resume!r} is neither none, auto nor an existing "
                "checkpoint or run folder"
            )
    if t.log_sync_s < 0:
        e.append("trainer.log_sync_s: must be >= 0")
    for name in t.loggers:
        if name not in LOGGERS:
            e.append(f"trainer.loggers: unknown logger {name!r}; use any of {', '.join(LOGGERS)}")
        elif LOGGERS[name] and importlib.util.find_spec(LOGGERS[name]) is None:
            extra = f"'rlalign-ray[{name}]'" if name in OPTIONAL_LOGGERS else LOGGERS[name]
            e.append(
                f"trainer.loggers: {name} is not installed; pip install {extra} "
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


STORAGE_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def _check_uri(e: list[str], key: str, url: str) -> bool:
    """Whether ``url`` is a URI (not a local path); if so, that fsspec knows its protocol
    and its backend is installed (``s3fs`` for s3://: ``pip install 'rlalign-ray[s3]'``)."""
    if "://" not in url or url.startswith("file://"):
        return False
    import fsspec

    proto = fsspec.core.split_protocol(url)[0]
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError as err:
        extra = STORAGE_EXTRAS.get(proto)
        fix = f"pip install 'rlalign-ray[{extra}]'" if extra else str(err)
        e.append(f"{key}: {url!r} needs the {proto}:// filesystem, not installed: {fix}")
    except ValueError:
        e.append(
            f"{key}: {url!r}: fsspec knows no {proto}:// filesystem; use a local folder, "
            "s3://bucket/path or gs://bucket/path"
        )
    return True


CHECKS = (
    check_options,
    check_run,
    check_rollout,
    check_sync,
    check_gpu_layout,
    check_algorithm,
    check_sampling_math,
    check_critic,
    check_learner,
    check_reference,
    check_model,
    check_env,
    check_reward,
    check_pools,
    check_data,
    check_trainer,
)
