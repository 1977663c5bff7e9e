"""Fast tests for the tiny local model, arithmetic task, reward and builtin paths."""

from __future__ import annotations

import json
import os
import pathlib
import threading

import pytest

from rlalign_ray.models import builtin
from rlalign_ray.models.tiny import (
    build_tiny_model,
    build_tokenizer,
    generate_completions,
    greedy_accuracy,
    warmup_sft,
)
from rlalign_ray.rewards.builtin import arithmetic_exact
from rlalign_ray.tasks import arithmetic

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    build_tiny_model(str(d), **SMALL)
    return str(d)


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.padding_side == "left"
    for text in [" 1 + 2 = 3", "23+45=68", "a b\nc:  d "]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
        assert len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    ]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "user: 1+2=\nassistant: "


def test_model_loads_and_generates(small_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = set(os.listdir(small_model_dir))
    assert {"model.safetensors", "config.json", "generation_config.json"} <= files
    model = AutoModelForCausalLM.from_pretrained(small_model_dir)
    tok = AutoTokenizer.from_pretrained(small_model_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert cfg.vocab_size == len(tok)
    enc = tok(["1+2=", "11+22="], return_tensors="pt", padding=True)
    assert enc["input_ids"][0, 0] == tok.pad_token_id  # left padding
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    n_in = enc["input_ids"].shape[1]
    assert out.shape[0] == 2 and n_in < out.shape[1] <= n_in + 3
    comps = generate_completions(model, tok, ["1+2=", "3+4="], max_new_tokens=3)
    assert len(comps) == 2 and all(isinstance(c, str) for c in comps)
    with torch.no_grad():
        assert model(**enc).logits.shape[-1] == len(tok)


def test_reward_function():
    prompts = ["2+3="] * 6
    comps = ["5", "5</s>", " 5 \n7", "55", "", "6"]
    assert (
        arithmetic_exact(prompts=prompts, completions=comps, answer=["5"] * 6)
        == [1, 1, 1] + [0] * 3
    )
    assert arithmetic_exact(completions=["18<pad>"], answer=[18], extra_col=[1]) == [1.0]
    assert arithmetic_exact(completions=["18</s><pad>"], answer=[18]) == [1.0]
    with pytest.raises(ValueError):
        arithmetic_exact(completions=["2", "2"], answer=["2"])


def test_dataset_files_parse_and_are_disjoint(tmp_path):
    data = REPO / "configs" / "data"
    train = arithmetic.read_jsonl(str(data / "arith_train.jsonl"))
    evals = arithmetic.read_jsonl(str(data / "arith_eval.jsonl"))
    assert len(train) == 2000 and 64 <= len(evals) <= 128
    for row in train + evals:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["answer"] == str(int(a) + int(b))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert len({r["prompt"] for r in train}) == len(train)
    # committed files are exactly reproducible
    paths = arithmetic.write_datasets(str(tmp_path))
    assert pathlib.Path(paths["train"]).read_text() == (data / "arith_train.jsonl").read_text()
    assert pathlib.Path(paths["eval"]).read_text() == (data / "arith_eval.jsonl").read_text()
    assert arithmetic.make_problems(5, seed=3) == arithmetic.make_problems(5, seed=3)


def test_resolve_model_path():
    assert builtin.resolve_model_path("/some/local/model") == "/some/local/model"
    assert builtin.resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ValueError, match="builtin:tiny-arith"):
        builtin.resolve_model_path("builtin:does-not-exist")


def test_builtin_build_is_locked_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("RLALIGN_RAY_CACHE", str(tmp_path))
    recipe = json.loads(json.dumps(builtin.BUILTIN_RECIPES["tiny-arith"]))
    recipe["model"] = SMALL
    recipe["warmup"] = {"steps": 3, "lr": 1e-3, "batch_size": 8, "seed": 0}
    monkeypatch.setitem(builtin.BUILTIN_RECIPES, "tiny-arith", recipe)

    calls = []
    real_build = builtin._build

    def counting_build(*args, **kwargs):
        calls.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(builtin, "_build", counting_build)
    results, errors = [], []

    def worker():
        try:
            results.append(builtin.resolve_model_path("builtin:tiny-arith"))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    path = results[0]
    assert path == builtin.builtin_model_dir("tiny-arith")
    assert path.startswith(str(tmp_path / "models" / "tiny-arith-"))
    # no temp dirs left behind, marker present, second call reuses it
    leftovers = [p for p in os.listdir(tmp_path / "models") if p.startswith(".tmp")]
    assert leftovers == []
    info = json.loads((pathlib.Path(path) / builtin.MARKER).read_text())
    assert info["warmup"]["steps"] == 3
    assert builtin.resolve_model_path("builtin:tiny-arith") == path and len(calls) == 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    acc = greedy_accuracy(model, tok, arithmetic.make_problems(4, seed=0))
    assert 0.0 <= acc <= 1.0


def test_warmup_sft_reduces_loss(small_model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(small_model_dir, d)
    before = (d / "model.safetensors").read_bytes()
    problems = arithmetic.make_problems(64, seed=0, hi=9)
    m = warmup_sft(str(d), problems, steps=30, lr=1e-2, batch_size=16, seed=0)
    assert m["steps"] == 30 and m["final_loss"] < m["first_loss"] - 1.0
    assert (d / "model.safetensors").read_bytes() != before  # saved in place


def test_doctests():
    import doctest

    from rlalign_ray.rewards import builtin as rewards_builtin

    for mod in (rewards_builtin, arithmetic):
        assert doctest.testmod(mod).failed == 0
