"""Multi-turn rollouts with the HF backend (no Ray): the loss mask covers exactly the
generated tokens, the learner's log-probs equal the generator's, episodes cut at max_turns
are truncated, and a failing or hanging environment is named with its episode."""

from __future__ import annotations

import time

import pytest
import torch

from rlalign_ray.config import EnvConfig, ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.envs import EnvError
from rlalign_ray.envs.builtin import CalculatorEnv, GuessNumberEnv, safe_eval
from rlalign_ray.models.loading import batch_logprobs, load_tokenizer
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.rollout.multiturn import stop_cut

ITEMS = [PromptItem(3, "1+2=", {"answer": "3"}), PromptItem(5, "10+20=", {"answer": "30"})]


def _gen(tiny_model, **env):
    cfg = EnvConfig(**{"path": "helpers.envs:EchoEnv", "max_turns": 3, **env})
    rollout = RolloutConfig(max_new_tokens=4, ignore_eos=True)
    return Generator(ModelConfig(path=tiny_model), rollout, seed=0, env=cfg)


def _segments(mask: list[float]) -> list[tuple[float, int, int]]:
    """Runs of equal mask values: (value, start, end)."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


def test_mask_covers_exactly_the_generated_tokens(tiny_model):
    from helpers.envs import EchoEnv

    EchoEnv.log.clear()
    gen = _gen(tiny_model)
    b = gen.generate(ITEMS, n_samples=2)
    assert b.group_ids.tolist() == [3, 3, 5, 5] and len(EchoEnv.log) == 4
    tok = gen.tok
    for row, (index, actions, observations) in enumerate(EchoEnv.log):
        n = int(b.response_len[row])
        ids, mask = b.response_ids[row, :n].tolist(), b.response_mask[row, :n].tolist()
        segs = _segments(mask)
        # action (1), observation (0), action, observation, action: 3 turns, no final obs
        assert [v for v, _, _ in segs] == [1.0, 0.0, 1.0, 0.0, 1.0]
        gen_segs = [ids[s:e] for v, s, e in segs if v == 1.0]
        obs_segs = [ids[s:e] for v, s, e in segs if v == 0.0]
        assert [len(g) for g in gen_segs] == [4, 4, 4]  # max_new_tokens each
        assert [tok.decode(g, skip_special_tokens=True) for g in gen_segs] == actions
        # observation tokens are the observation text alone, tokenised
        assert obs_segs == [tok(o, add_special_tokens=False)["input_ids"] for o in observations[:2]]
        assert torch.all(b.logprobs[row, :n][b.response_mask[row, :n] == 1] < 0)
        assert torch.all(b.logprobs[row][b.response_mask[row] == 0] == 0)
    assert b.columns["env_reward"] == [0.75] * 4  # env.reward: sum of 3 x 0.25
    assert b.columns["answer"] == ["3", "3", "30", "30"]


def test_learner_logprobs_equal_the_generators(tiny_model):
    gen = _gen(tiny_model, reward="last")
    b = gen.generate(ITEMS, n_samples=3)
    assert b.columns["env_reward"] == [0.25] * 6
    again = batch_logprobs(gen.backend._model, b, 1.0, 4, torch.device("cpu"))
    assert (b.response_mask.sum(1) == 12).all()
    assert torch.allclose(again, b.logprobs, atol=1e-5, rtol=0)


def test_max_turns_marks_episodes_truncated(tiny_model):
    b = _gen(tiny_model, max_turns=2).generate(ITEMS, n_samples=1)
    assert b.truncated.tolist() == [True, True]
    assert b.columns["env_turns"] == [2, 2]


def test_calculator_episode_terminates(tiny_model):
    """A calculator episode, generated greedily: whatever the model writes, the episode
    ends (an answer terminates it; tool calls are capped) and its reward is 0 or 1."""
    gen = _gen(tiny_model, path="rlalign_ray.envs.builtin:CalculatorEnv", stop=[">"], reward="last")
    b = gen.generate(ITEMS, n_samples=2)
    assert set(b.columns["env_reward"]) <= {0.0, 1.0}
    assert all(1 <= t <= 3 for t in b.columns["env_turns"])


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "helpers.envs:RaisesEnv",
            r"environment helpers.envs:RaisesEnv step of episode \(prompt 3, sample 0\), "
            r"turn 1 raised RuntimeError: the simulator crashed",
        ),
        (
            "helpers.envs:BadReturnEnv",
            r"BadReturnEnv step of episode \(prompt 3, sample 0\) "
            r"returned tuple",
        ),
        ("helpers.envs:NoSuchEnv", r"env.path: cannot load 'helpers.envs:NoSuchEnv'"),
    ],
)
def test_failing_environment_is_named(tiny_model, path, message):
    with pytest.raises(EnvError, match=message):
        _gen(tiny_model, path=path).generate(ITEMS, n_samples=1)


def test_hanging_environment_times_out(tiny_model):
    gen = _gen(tiny_model, path="helpers.envs:HangsEnv", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(
        EnvError,
        match=r"HangsEnv step of episode \(prompt 3, sample 0\), turn 1 did not return "
        r"within 0.5s \(env.timeout_s\)",
    ):
        gen.generate(ITEMS, n_samples=1)
    assert time.monotonic() - t0 < 5


def test_async_environment(tiny_model):
    b = _gen(tiny_model, path="helpers.envs:AsyncEchoEnv", max_turns=2).generate(ITEMS, 1)
    assert b.columns["env_reward"] == [0.5, 0.5]


def test_stop_cut_keeps_tokens_up_to_the_stop_string(tiny_model):
    tok = load_tokenizer(tiny_model)
    ids = tok("<1+2>45", add_special_tokens=False)["input_ids"]
    assert stop_cut(tok, ids, [">"]) == 5
    assert stop_cut(tok, ids, ["x"]) == len(ids)
    assert stop_cut(tok, ids, []) == len(ids)


def test_builtin_environments():
    calc = CalculatorEnv(max_calls=2)
    calc.reset(PromptItem(0, "12+34+5=", {"answer": "51"}))
    r = calc.step("<12+34>")
    assert (r.observation, r.terminated, r.truncated) == ("=46 ", False, False)
    assert calc.step("<1/0>").observation == "=error: division by zero "
    assert calc.step("<1+1>").truncated  # max_calls
    calc.reset(PromptItem(0, "p", {"answer": "51"}))
    assert calc.step(" 51").reward == 1.0
    with pytest.raises(ValueError, match="power too large"):
        safe_eval("10**10**10")
    game = GuessNumberEnv(seed=0)
    game.reset(PromptItem(0, "guess:", {"secret": 7}))
    assert game.step("3").observation == " higher\n"
    assert game.step("9").observation == " lower\n"
    assert game.step("x").observation == " a number please\n"
    assert game.step("7").terminated


def test_env_config_is_validated():
    from rlalign_ray.config import config_from_dict
    from rlalign_ray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from_dict(
            {
                "env": {"path": "nocolon", "reward": "max", "max_turns": 0},
                "reward": {"rewards": []},
                "algorithm": {"overlong_buffer": 2},
            }
        )
    text = str(e.value)
    assert "env.path: write it as module:Class" in text
    assert "env.reward: use one of sum, last, rewards-only" in text
    assert "env.max_turns: must be > 0" in text
    assert "algorithm.overlong_buffer: counts a whole multi-turn trajectory" in text
    with pytest.raises(ConfigError, match="reward.rewards: give at least one reward"):
        config_from_dict(
            {"env": {"path": "a:B", "reward": "rewards-only"}, "reward": {"rewards": []}}
        )


def test_advantages_on_multiturn_masks():
    """Action, observation, action: outcome advantages and GAE live on generated tokens
    only; the trajectory's reward sits on its last generated token."""
    from rlalign_ray.algorithms import compute_token_rewards, gae, outcome_advantages

    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, 0.0])
    rewards = compute_token_rewards(scores, mask)
    assert rewards[0].tolist() == [0, 0, 0, 0, 0, 1.0, 0] and rewards[1].abs().sum() == 0
    adv, _ = gae(rewards, torch.zeros_like(mask), mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    out = outcome_advantages("grpo", scores, torch.tensor([0, 0]), mask)
    assert torch.all(out[mask == 0] == 0) and torch.all(out[0][mask[0] == 1] > 0)


def test_scorer_adds_the_environment_reward(tiny_model):
    """The environment's reward is ``reward/env`` and adds to the reward functions, which
    do not see the generator's env_* columns."""
    from rlalign_ray.config import RewardConfig, RewardSpec
    from rlalign_ray.rewards.scorer import RewardScorer

    b = _gen(tiny_model, max_turns=2).generate(ITEMS, n_samples=1)
    spec = RewardSpec(type="function", path="helpers.rewards:uses_answer")
    shard = RewardScorer(RewardConfig(rewards=[spec])).score(b)
    assert shard.breakdown["env"].tolist() == [0.5, 0.5]
    assert torch.allclose(shard.scores, 0.5 + shard.breakdown["uses_answer"])
    only_env = RewardScorer(RewardConfig(rewards=[])).score(b)
    assert only_env.scores.tolist() == [0.5, 0.5]
