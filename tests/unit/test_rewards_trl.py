"""Rewards as TRL calls them: keyword arguments, conversational completions, None for
"not applicable", async functions, a remote reward over HTTP (a local server), and reward
models that read conversations through their own chat template. No Ray."""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers.reward_server import digit_fraction, reward_server

from rlalign_ray.config import RewardConfig, RewardSpec
from rlalign_ray.data.batch import NONFINITE, RolloutBatch
from rlalign_ray.errors import ConfigError, RewardError
from rlalign_ray.rewards.scorer import RewardScorer
from rlalign_ray.rewards.sources import FunctionReward, HttpReward, RewardInputs, load_reward
from rlalign_ray.rewards.types import check_reward_function

CPU = torch.device("cpu")


def _batch(completions, prompts=None, version=3, **columns):
    n = len(completions)
    ids = torch.tensor([[5, 6, 2], [5, 2, 0], [7, 7, 7], [8, 0, 0]])[:n]
    return RolloutBatch(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        response_ids=ids,
        response_len=torch.tensor([3, 2, 3, 1])[:n],
        response_mask=torch.ones(n, 3),
        logprobs=torch.zeros(n, 3),
        version=version,
        group_ids=torch.zeros(n, dtype=torch.long),
        prompts=[p if isinstance(p, str) else "user: x\nassistant: " for p in prompts]
        if prompts
        else ["1+2="] * n,
        completions=completions,
        columns=columns,
        raw_prompts=prompts,
    )


def _scorer(*paths, **kw):
    specs = [RewardSpec(type="function", path=p) for p in paths]
    return RewardScorer(RewardConfig(rewards=specs, **kw))


def test_trl_doc_rewards_are_called_with_keywords():
    out = _scorer(
        "helpers.trl_rewards:reward_len_tokens",
        "helpers.trl_rewards:reward_len_chars",
        "helpers.trl_rewards:reward_ground_truth",
        "helpers.trl_rewards:async_reward_func",
    ).score(_batch(["\\boxed{3}", "ab"], ground_truth=["3", "4"]))
    b = {k: v.tolist() for k, v in out.breakdown.items()}
    assert b["reward_len_tokens"] == [3.0, 2.0]  # completion_ids: the sampled tokens
    assert b["reward_len_chars"] == [9.0, 2.0]
    assert b["reward_ground_truth"] == [1.0, 0.0]  # the dataset's ground_truth column
    assert b["async_reward_func"] == [1.0, 1.0]  # async def: awaited
    assert out.scores.tolist() == [14.0, 5.0]


def test_trainer_state_and_every_keyword():
    out = _scorer("helpers.rewards:sees_everything").score(_batch(["a", "b"], version=7, x=[1, 2]))
    assert out.scores.tolist() == [7.0, 7.0]  # global_step: the weights' version


def test_conversational_prompts_give_conversational_completions():
    msgs = [{"role": "user", "content": "Think, then answer"}]
    out = _scorer("helpers.trl_rewards:format_reward_func").score(
        _batch(["<think>hm</think><answer>4</answer>", "4"], prompts=[msgs, msgs])
    )
    assert out.scores.tolist() == [1.0, 0.0]
    inputs = RewardInputs.from_batch(_batch(["x"], prompts=[msgs]))
    assert inputs.prompts == [msgs] and inputs.completions == [
        [{"role": "assistant", "content": "x"}]
    ]
    assert inputs.texts == ["user: x\nassistant: "]  # what the policy saw, for messages


def test_none_is_not_applicable():
    # odd_answers_only applies to odd answers; digit_fraction to all: the total is the
    # weighted sum of the rewards that apply (TRL's nansum)
    cfg = RewardConfig(
        rewards=[
            RewardSpec(path="helpers.rewards:odd_answers_only", weight=2.0),
            RewardSpec(path="helpers.rewards:digit_fraction", weight=1.0),
        ]
    )
    out = RewardScorer(cfg).score(_batch(["3", "4x"], answer=["3", "4"]))
    assert out.scores.tolist() == [2.0 * 1.0 + 1.0, 0.5]
    odd = out.breakdown["odd_answers_only"]
    assert odd[0] == 1.0 and math.isnan(odd[1])  # NaN: left out of the logged mean
    assert float(odd.nanmean()) == 1.0


def test_a_sample_no_reward_applies_to_follows_on_nonfinite():
    with pytest.raises(RewardError) as err:
        _scorer("helpers.rewards:never_applies").score(_batch(["a", "b"]))
    msg = str(err.value)
    assert "every reward ('helpers.rewards:never_applies') returned None for sample 0" in msg
    assert "reward.on_nonfinite: zero" in msg
    out = _scorer("helpers.rewards:never_applies", on_nonfinite="zero").score(_batch(["a", "b"]))
    assert out.scores.tolist() == [0.0, 0.0] and out.breakdown[NONFINITE].tolist() == [1, 1]
    out = _scorer("helpers.rewards:never_applies", on_nonfinite="drop_group").score(
        _batch(["a", "b"])
    )
    assert torch.isnan(out.scores).all()


def test_signature_check_names_the_function_and_the_fix():
    check_reward_function("k", "helpers.trl_rewards:reward_len_chars", ["answer"])
    check_reward_function("k", "helpers.rewards:uses_answer", ["answer"])
    with pytest.raises(RewardError) as err:
        check_reward_function("reward.rewards[0].path", "helpers.rewards:completions_only", [])
    msg = str(err.value)
    assert "reward.rewards[0].path" in msg and "'helpers.rewards:completions_only'" in msg
    assert "def completions_only(completions, **kwargs)" in msg and "completion_ids" in msg
    with pytest.raises(RewardError, match="dataset's columns \\['ground_truth'\\]"):
        check_reward_function("k", "helpers.rewards:uses_answer", ["ground_truth"])


def test_async_reward_keeps_one_event_loop():
    fn = FunctionReward(RewardSpec(path="helpers.trl_rewards:async_reward_func"))
    assert fn(RewardInputs.of(["p", "p"], ["x", ""])) == [1.0, 0.0]
    loop = fn._loop
    assert fn(RewardInputs.of(["p"], ["y"])) == [1.0] and fn._loop is loop


def _http(url, **kw) -> HttpReward:
    return load_reward(RewardSpec(type="http", url=url, **kw), CPU)


def test_http_reward_batches_json_and_sends_the_token(monkeypatch):
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    with reward_server(token="s3cret") as (url, state):
        rm = _http(url, batch_size=2, token_env="RM_TOKEN")
        inputs = RewardInputs.of(
            ["1+2="] * 3, ["3", "3x", "xx"], {"answer": ["3"] * 3}, [[1], [1, 2], [3]], 4
        )
        assert rm(inputs) == [digit_fraction(c) for c in ["3", "3x", "xx"]]
    assert state["requests"] == 2  # batches of 2
    first = state["bodies"][0]
    assert first["completions"] == ["3", "3x"] and first["answer"] == ["3", "3"]
    assert first["completion_ids"] == [[1], [1, 2]] and first["trainer_state"] == {"global_step": 4}


def test_http_reward_retries_then_names_the_url():
    with reward_server(fail_first=1) as (url, state):
        assert _http(url, retries=1)(RewardInputs.of(["p"], ["12"])) == [1.0]
        assert state["requests"] == 2
    with reward_server(fail_first=5) as (url, state):
        with pytest.raises(RewardError, match=f"http reward '{url}' failed 2 time"):
            _http(url, retries=1)(RewardInputs.of(["p"], ["1"]))
    with reward_server(token="right") as (url, state):
        with pytest.raises(RewardError, match="refused the request \\(HTTP 401"):
            _http(url, retries=3)(RewardInputs.of(["p"], ["1"]))
        assert state["requests"] == 1  # a 4xx is not tried again


def test_http_reward_that_times_out_fails_within_seconds():
    with reward_server(sleep_s=5) as (url, _):
        scorer = RewardScorer(
            RewardConfig(rewards=[RewardSpec(type="http", url=url, timeout_s=0.5, retries=1)])
        )
        t = time.perf_counter()
        with pytest.raises(RewardError) as err:
            scorer.score(_batch(["1", "2"]))
        assert time.perf_counter() - t < 4
    msg = str(err.value)
    assert url in msg and "no answer within 0.5s" in msg and "timeout_s" in msg


def test_http_reward_errors_are_clear(monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(RewardError, match="'NO_SUCH_TOKEN' \\(token_env\\) is not set"):
        _http("http://127.0.0.1:9/x", token_env="NO_SUCH_TOKEN")
    with pytest.raises(RewardError, match="failed 1 time.*server is up"):  # nothing listens
        _http("http://127.0.0.1:9/x", retries=0)(RewardInputs.of(["p"], ["1"]))
    from rlalign_ray.config import config_from_dict

    with pytest.raises(ConfigError, match="reward.rewards\\[0\\].url: an http reward needs"):
        config_from_dict({"reward": {"rewards": [{"type": "http", "url": "localhost:80"}]}})


def test_reward_model_uses_its_own_chat_template(tmp_path, tiny_model):
    from helpers.models import save_tiny_reward_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    save_tiny_reward_model(tok, str(tmp_path))
    rm = load_reward(RewardSpec(type="model", path=str(tmp_path)), CPU)
    msgs = [{"role": "user", "content": "1+2="}]
    chat = RewardInputs.of([msgs], ["3"], texts=["policy: 1+2="])
    assert rm.texts(chat) == ["<s><user>1+2=<assistant>3"]  # its template, not the policy's
    assert rm.texts(RewardInputs.of(["1+2="], ["3"])) == ["1+2=3"]  # plain: prompt + completion
    from rlalign_ray.data.render import encode_one_bos

    ids = encode_one_bos(rm.tok, rm.texts(chat)[0], rm.bos_id)
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert len(rm(chat)) == 1
