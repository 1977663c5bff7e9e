"""Config loading: YAML + dotted overrides, typed, every problem named with its fix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rlalign_ray.config import Config, config_from_dict, load_config
from rlalign_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
REWARD = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]


def _problems(raw=None, overrides=None, path=None):
    with pytest.raises(ConfigError) as err:
        if path is not None:
            load_config(path, overrides)
        else:
            config_from_dict(raw)
    return err.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if "backend: vllm" in path.read_text() and importlib.util.find_spec("vllm") is None:
        pytest.skip("uses rollout.backend: vllm, which is not installed")
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            "trainer.steps=20",
            "rollout.n_samples=8",
            "learner.lr=3e-4",
            "trainer.tensorboard=false",
            "run.ray_address=auto",
        ],
    )
    assert cfg.trainer.steps == 20 and cfg.rollout.n_samples == 8
    assert cfg.learner.lr == 3e-4 and cfg.trainer.tensorboard is False
    assert cfg.run.ray_address == "auto"
    assert cfg.batch_size == cfg.rollout.prompts_per_step * 8


def test_unknown_key_suggests_the_close_one():
    (p,) = _problems({"reward": {"rewards": REWARD}, "trainer": {"stepz": 3}})
    assert p.startswith("trainer.stepz: unknown key; did you mean trainer.steps?")


def test_unknown_section_and_bad_override_syntax(tmp_path):
    probs = _problems(
        path=REPO / "configs/demo_cpu.yaml", overrides=["trainer.steps", "rollot.n=1"]
    )
    assert any("write it as key.path=value" in p for p in probs)
    assert any(p.startswith("rollot: unknown key; did you mean rollout?") for p in probs)


def test_wrong_types_are_named():
    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "rollout": {"n_samples": "eight", "temperature": "hot"},
            "trainer": {"tensorboard": "yes"},
        }
    )
    assert "rollout.n_samples: expected an integer, got 'eight'" in probs
    assert "rollout.temperature: expected a number, got 'hot'" in probs
    assert "trainer.tensorboard: expected true or false, got 'yes'" in probs


def test_batch_must_split_into_mini_and_micro_batches():
    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "rollout": {"prompts_per_step": 3, "n_samples": 4},
            "learner": {"world_size": 2, "micro_batch_size": 4, "mini_batch_size": 8},
        }
    )
    # batch = 3 * 4 = 12 sequences; 12 % 8 != 0; 8 % (2 * 4) == 0
    assert any(p.startswith("learner.mini_batch_size: the batch of 12") for p in probs)
    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "rollout": {"prompts_per_step": 4, "n_samples": 4},
            "learner": {"world_size": 2, "micro_batch_size": 3},
        }
    )
    # mini = batch = 16; 16 % (2 * 3) != 0
    assert any(
        "not divisible by 6" in p and p.startswith("learner.micro_batch_size") for p in probs
    )


def test_group_estimators_need_groups():
    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "rollout": {"n_samples": 1},
            "learner": {"micro_batch_size": 1},
        }
    )
    assert any(p.startswith("rollout.n_samples: grpo compares samples") for p in probs)


def test_unknown_algorithm_and_estimator_and_missing_reward():
    probs = _problems({"algorithm": {"name": "ppo2", "kl_estimator": "k9"}})
    names = "ppo, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline"
    assert f"algorithm.name: use one of {names}, or a module:function; got 'ppo2'" in probs
    assert "algorithm.kl_estimator: use one of k1, k2, k3, abs or null; got 'k9'" in probs
    assert any(p.startswith("reward.rewards: give at least one reward") for p in probs)


def test_reward_spec_checks():
    probs = _problems(
        {
            "reward": {
                "rewards": [
                    {"type": "function", "path": "no_colon"},
                    {"type": "magic", "path": "x"},
                ]
            }
        }
    )
    assert any(
        p.startswith("reward.rewards[0].path: a function reward is 'module:function'")
        for p in probs
    )
    assert any(
        p
        == "reward.rewards[1].type: use one of function, model, embedding, http, math; got 'magic'"
        for p in probs
    )


def test_missing_file_and_bad_yaml(tmp_path):
    assert _problems(path=tmp_path / "nope.yaml")[0].endswith("does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    assert "not valid YAML" in _problems(path=bad)[0]


def test_cli_prints_the_problems_without_a_traceback(capsys):
    from rlalign_ray.cli import main

    code = main(["check-config", str(REPO / "configs/demo_cpu.yaml"), "trainer.steps=-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "trainer.steps: must be >= 0, got -1" in err and "Traceback" not in err


def test_logprob_chunks_and_token_budgets():
    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "data": {"max_prompt_tokens": 100},
            "rollout": {"max_new_tokens": 28},
            "learner": {"logprob_chunk_size": -1, "max_tokens_per_micro_batch": 127},
            "critic": {"max_tokens_per_micro_batch": -5},
            "run": {"driver_threads": -1},
        }
    )
    assert "learner.logprob_chunk_size: must be >= 0, got -1" in probs
    assert "run.driver_threads: must be >= 0, got -1" in probs
    budget = [p for p in probs if "max_tokens_per_micro_batch" in p]
    assert budget[0].startswith("learner.max_tokens_per_micro_batch: must be 0 (off) or hold")
    assert "= 128 tokens, got 127" in budget[0] and budget[1].startswith("critic.")
    cfg = config_from_dict(
        {"reward": {"rewards": REWARD}, "learner": {"max_tokens_per_micro_batch": 528}}
    )
    assert cfg.learner.max_tokens_per_micro_batch == 528


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_need_bf16_training(dtype):
    probs = _problems({"reward": {"rewards": REWARD}, "model": {"dtype": dtype}})
    assert any(
        p.startswith(f"model.dtype: {dtype} weights with learner.bf16: false")
        and "set learner.bf16: true, or model.dtype: float32" in p
        for p in probs
    )
    cfg = config_from_dict(
        {"reward": {"rewards": REWARD}, "model": {"dtype": dtype}, "learner": {"bf16": True}}
    )
    assert cfg.learner.bf16


def test_options_are_checked_by_type_with_every_other_problem():
    from rlalign_ray.config import validate

    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "sync": {"transport": "nccl"},
            "rollout": {"dtype": "fp8"},
            "trainer": {"steps": -1},
            "learner": {"placement": {"strategy": "EVERYWHERE"}},
        }
    )
    assert (
        "sync.transport: use one of auto, collective, cuda_ipc, shared_memory, object_store; got 'nccl'"
        in probs
    )
    assert "rollout.dtype: use one of float32, bfloat16, float16 or null; got 'fp8'" in probs
    assert (
        "learner.placement.strategy: use one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD; got 'EVERYWHERE'"
        in probs
    )
    assert "trainer.steps: must be >= 0, got -1" in probs  # reported with them
    assert config_from_dict({"reward": {"rewards": REWARD}, "rollout": {"dtype": None}})
    cfg = Config()  # built in Python: validate checks the options all the same
    cfg.learner.optimizer = "lion"
    assert "learner.optimizer: use one of adamw, sgd; got 'lion'" in validate(cfg)


def test_algorithm_options_come_from_the_registries_and_take_user_functions():
    from helpers.objectives import median_baseline, reinforce_loss

    from rlalign_ray.algorithms import POLICY_LOSSES

    POLICY_LOSSES["ppo_clip_copy"] = POLICY_LOSSES["ppo_clip"]  # a new entry: allowed at once
    try:
        assert (
            config_from_dict(
                {"reward": {"rewards": REWARD}, "algorithm": {"policy_loss": "ppo_clip_copy"}}
            ).objective.loss.name
            == "ppo_clip"
        )
    finally:
        del POLICY_LOSSES["ppo_clip_copy"]
    user = {
        "policy_loss": "helpers.objectives:reinforce_loss",
        "name": "helpers.objectives:median_baseline",
    }
    o = config_from_dict({"reward": {"rewards": REWARD}, "algorithm": user}).objective
    assert o.loss.fn is reinforce_loss and o.estimator.compute is median_baseline
    assert o.estimator.per_sequence and o.estimator.needs_groups and not o.estimator.needs_critic
    assert (o.clip_low, o.clip_high, o.agg) == (0.2, 0.2, "token-mean")  # ppo_clip's defaults
    probs = _problems(
        {
            "reward": {"rewards": REWARD},
            "algorithm": {"policy_loss": "helpers.objectives:nope", "name": "no_such_module:f"},
        }
    )
    assert any(
        p.startswith(
            "algorithm.policy_loss: cannot import the policy loss "
            "'helpers.objectives:nope' (AttributeError"
        )
        for p in probs
    ), probs
    assert any(
        p.startswith(
            "algorithm.name: cannot import the advantage estimator "
            "'no_such_module:f' (ModuleNotFoundError"
        )
        for p in probs
    ), probs
    (p,) = _problems(
        {
            "reward": {"rewards": REWARD},
            "algorithm": {"policy_loss": "helpers.objectives:wrong_signature"},
        }
    )
    assert p.startswith(
        "algorithm.policy_loss: the policy loss "
        "'helpers.objectives:wrong_signature' must take (logp, old_logp"
    ), p


def test_per_loss_defaults_and_the_kl_estimator_by_where_the_kl_goes():
    def objective(**algorithm):
        return config_from_dict({"reward": {"rewards": REWARD}, "algorithm": algorithm}).objective

    o = objective()
    assert (o.loss.name, o.clip_low, o.clip_high, o.agg, o.kl_estimator) == (
        "ppo_clip",
        0.2,
        0.2,
        "token-mean",
        "k3",
    )
    o = objective(policy_loss="gspo")
    assert (o.clip_low, o.clip_high, o.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    o = objective(policy_loss="cispo", clip_high=0.5, loss_agg="seq-mean-token-mean")
    assert (o.clip_low, o.clip_high, o.agg) == (1.0, 0.5, "seq-mean-token-mean")
    o = objective(name="reinforce_pp", kl_coef=0.01, kl_in_reward=True)
    assert o.kl_estimator == "k1"  # null: k1 in the reward


def test_objective_combinations_that_are_refused():
    def problems(**algorithm):
        raw = {"reward": {"rewards": REWARD}, "algorithm": algorithm}
        try:
            config_from_dict(raw)
        except ConfigError as e:
            return e.problems
        return []

    in_reward = {"name": "reinforce_pp", "kl_coef": 0.01, "kl_in_reward": True}
    for est in ("k2", "k3", "abs"):
        (p,) = problems(**in_reward, kl_estimator=est)
        assert p.startswith(f"algorithm.kl_estimator: {est} in the reward") and "E[k" in p
    assert problems(**in_reward) == problems(**in_reward, kl_estimator="k1") == []
    (p,) = problems(kl_coef=0.0, kl_target=0.1)
    assert p.startswith("algorithm.kl_target: the adaptive controller scales kl_coef")
    (p,) = problems(policy_loss="gspo", dual_clip=3.0)
    assert p.startswith("algorithm.dual_clip:") and "gspo" in p
    assert problems(dual_clip=3.0) == []
    for bad in ([2.0, 3.0], [0.5], [1.0, 1.0]):
        (p,) = problems(behaviour_seq_mask=bad)
        assert p.startswith("algorithm.behaviour_seq_mask: give [lo, hi]"), bad
    assert problems(behaviour_seq_mask=[0.5, 2.0]) == []
    (p,) = problems(behaviour_seq_mask=[0.5, 2.0], use_behaviour_logprobs=True)
    assert "use_behaviour_logprobs" in p
    # the per-sequence rule reads the registry: a user's per-sequence estimator too
    (p,) = problems(name="helpers.objectives:median_baseline", kl_coef=0.01, kl_in_reward=True)
    assert p.startswith("algorithm.kl_in_reward: helpers.objectives:median_baseline scores")
