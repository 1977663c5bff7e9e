"""Two training steps each, on a real local Ray instance: the demo data as a Parquet file
scored by TRL's documented reward functions (keyword calls, ``completion_ids``, a
``ground_truth`` column, an async one, one returning None), with ``data.truncation: drop``;
and the demo data as conversations in a ``save_to_disk`` folder, scored by TRL's
conversational format reward and a remote reward on a local HTTP server."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, small_config
from helpers.reward_server import reward_server

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration
datasets = pytest.importorskip("datasets")

LONG = 3  # prompts longer than data.max_prompt_tokens in the Parquet file


def _rows(name: str, n: int) -> list[dict]:
    lines = (REPO / "configs/data" / name).read_text().splitlines()[:n]
    return [json.loads(x) for x in lines]


def _run(cfg_dict) -> list[dict]:
    Trainer(config_from_dict(cfg_dict)).fit()
    path = cfg_dict["trainer"]["output_dir"] + "/metrics.jsonl"
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_parquet_with_trl_doc_rewards(ray_local, tiny_model, tmp_path):
    rows = [{**r, "ground_truth": r["answer"]} for r in _rows("arith_train.jsonl", 64)]
    rows += [{"prompt": "1234567890+1=", "answer": "1234567891", "ground_truth": "x"}] * LONG
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    evals = [{**r, "ground_truth": r["answer"]} for r in _rows("arith_eval.jsonl", 8)]
    datasets.Dataset.from_list(evals).to_parquet(str(tmp_path / "eval.parquet"))
    fn = "helpers.trl_rewards:"
    cfg = small_config(
        tiny_model,
        str(tmp_path / "run"),
        data={
            "train": str(tmp_path / "train.parquet"),
            "eval": str(tmp_path / "eval.parquet"),
            "max_prompt_tokens": 8,  # BOS + "99+99=" fits, the long ones do not
            "truncation": "drop",
        },
        reward={
            "rewards": [
                {"path": fn + "reward_len_tokens", "weight": 0.1},
                {"path": fn + "reward_len_chars", "weight": 0.1},
                {"path": fn + "reward_ground_truth"},
                {"path": fn + "async_reward_func", "weight": 0.5},
                {"path": "helpers.rewards:odd_answers_only"},
                {"path": "rlalign_ray.rewards.builtin:arithmetic_exact"},
            ],
            "num_actors": 1,
            "resources": {"num_cpus": 0.5},
        },
    )
    rows = _run(cfg)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2
    for name in ("reward_len_tokens", "reward_len_chars", "async_reward_func"):
        assert train[-1][f"train/reward/{name}"] > 0, name
    assert train[-1]["data/dropped"] == LONG


def test_conversational_save_to_disk_with_http_reward(ray_local, tiny_model, tmp_path):
    def chat(rows):
        return [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]

    datasets.Dataset.from_list(chat(_rows("arith_train.jsonl", 64))).save_to_disk(
        str(tmp_path / "train")
    )
    with reward_server() as (url, state):
        cfg = small_config(
            tiny_model,
            str(tmp_path / "run"),
            data={"train": str(tmp_path / "train"), "eval": None},
            reward={
                "rewards": [
                    {"type": "http", "name": "remote", "url": url, "timeout_s": 30},
                    {"path": "helpers.trl_rewards:format_reward_func"},
                    {"path": "rlalign_ray.rewards.builtin:arithmetic_exact"},
                ],
                "num_actors": 1,
                "resources": {"num_cpus": 0.5},
            },
        )
        rows = _run(cfg)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2 and "train/reward/remote" in train[-1]
    body = state["bodies"][0]
    assert body["prompts"][0][0]["role"] == "user"  # the messages, as in the dataset
    assert body["completions"][0][0]["role"] == "assistant"  # conversational completions
    assert {b["trainer_state"]["global_step"] for b in state["bodies"]} == {0, 1}
    assert "answer" in body and len(body["completion_ids"]) == len(body["completions"])
