"""The run, model and data sections: what to train, on what, where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from rlalign_ray.config.fields import Dtype, doc

Truncation = Literal["error", "left", "drop"]


@dataclass
class RunConfig:
    seed: int = doc(0, "seed for prompt sampling, generation and model init")
    ray_address: str | None = doc(
        None, "Ray cluster to attach to; null: RAY_ADDRESS, else an embedded local instance"
    )
    num_cpus: float | None = doc(
        None, "CPUs of the embedded instance; null: enough for every role (roles take turns)"
    )
    ship_working_dir: bool = doc(
        True,
        "attached to a cluster (not inside a Ray job, which has its own): upload the working "
        "directory to every node (runtime_env working_dir, minus runs/, .git/, caches and "
        "weight files), so module:name paths of files there import on the workers",
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
    dtype: Dtype = doc("float32", "parameter dtype: float32, bfloat16 or float16")
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
    system_prompt: str = doc(
        "",
        "a system message put first in every chat-rendered dataset prompt that has none "
        "(e.g. asking for the final answer in \\boxed{}); empty: none",
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
    truncation: Truncation = doc(
        "error",
        "a prompt over max_prompt_tokens: error (stop, naming file:line), left (keep its "
        "last tokens, count data/truncated), drop (leave it out, count data/dropped)",
    )
    eval_limit: int = doc(0, "evaluate on at most this many held-out prompts (0: all)")
