"""The vLLM backend: as a plain class (HF backend's conventions, log-probs equal to the
learner's, in-place weight reload), then inside the whole loop on a real local Ray instance.

vLLM engines take ~20 s each to start on CPU: this module starts four (one here, one with
stop strings in an actor, two generator actors in the loop test).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import VLLM_TESTS, small_config

from rlalign_ray.config import (
    EnvConfig,
    ModelConfig,
    RolloutConfig,
    VLLMConfig,
    config_from_dict,
)
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.models.loading import batch_logprobs, load_causal_lm, position_ids
from rlalign_ray.rollout.backend import truncate
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.trainers import Trainer

pytestmark = VLLM_TESTS
VLLM = {"kv_cache_gb": 0.25, "max_model_len": 64}  # rollout.vllm
ENGINE = {"backend": "vllm", "vllm": VLLMConfig(**VLLM)}
TEMPERATURE = 0.7
ITEMS = [PromptItem(i, p) for i, p in enumerate(["1+2=", "123+456=", "9+", "77+8=", "5", "+"])]


@pytest.fixture(scope="module")
def gen(tiny_model):
    """A generator with a vLLM engine in this process; torn down with the module."""
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it process-wide
    g = Generator(
        ModelConfig(path=tiny_model),
        RolloutConfig(max_new_tokens=8, temperature=TEMPERATURE, **ENGINE),
        seed=0,
    )
    yield g
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    del g
    destroy_model_parallel()
    destroy_distributed_environment()
    torch.set_num_threads = set_num_threads


def _learner_logprobs(model, batch):
    return batch_logprobs(model, batch, TEMPERATURE, 64, torch.device("cpu"))


def test_same_conventions_as_hf_backend(gen):
    b = gen.generate(ITEMS, n_samples=16)
    n, eos, pad = len(ITEMS) * 16, gen.backend.eos_ids, gen.tok.pad_token_id
    assert b.group_ids.tolist() == [i for i in range(len(ITEMS)) for _ in range(16)]
    assert b.response_ids.shape == (n, int(b.response_len.max())) and b.response_ids.shape[1] <= 8
    for row, length, truncated in zip(b.response_ids, b.response_len.tolist(), b.truncated):
        ended = row[length - 1].item() in eos
        # the length counts the EOS when one is emitted; truncated means none within 8 tokens
        assert ended != bool(truncated) and (ended or length == 8)
        assert not any(t in eos for t in row[: length - 1].tolist())
        assert torch.all(row[length:] == pad)
    assert 0 < int(b.truncated.sum()) < n, "expected both EOS-ended and truncated rows"
    assert torch.equal(b.response_mask.sum(1).long(), b.response_len)
    assert torch.all(b.logprobs[b.response_mask == 0] == 0)
    assert torch.all(b.logprobs[b.response_mask == 1] < 0)
    greedy = [gen.generate(ITEMS, n_samples=1, greedy=True).response_ids for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])


def test_logprobs_equal_the_learners(gen, tiny_model):
    b = gen.generate(ITEMS, n_samples=8)
    diff = (_learner_logprobs(load_causal_lm(tiny_model), b) - b.logprobs).abs()
    print(f"max |generator - learner| log-prob: {diff.max():.2e}")
    assert diff.max() < 1e-4


def test_multiturn_episodes(gen, tiny_model):
    """Multi-turn rollouts run unchanged on vLLM (each turn's context as token ids): the
    generated tokens keep their log-probs (the learner's), observations are masked out."""
    from helpers.envs import EchoEnv

    EchoEnv.log.clear()
    gen.env, gen.multiturn = EnvConfig(path="helpers.envs:EchoEnv", max_turns=3), None
    try:
        b = gen.generate(ITEMS[:3], n_samples=2)
    finally:
        gen.env, gen.multiturn = None, None
    for row, (_, actions, observations) in enumerate(EchoEnv.log):
        n = int(b.response_len[row])
        ids, mask = b.response_ids[row, :n], b.response_mask[row, :n]
        obs = [gen.tok(o, add_special_tokens=False)["input_ids"] for o in observations]
        assert ids[mask == 0].tolist() == [t for o in obs[: len(actions) - 1] for t in o]
        assert gen.tok.decode(ids[mask == 1], skip_special_tokens=True) == "".join(actions)
    assert torch.all(b.logprobs[b.response_mask == 1] < 0)
    diff = (_learner_logprobs(load_causal_lm(tiny_model), b) - b.logprobs).abs()
    print(f"multi-turn: max |generator - learner| log-prob: {diff.max():.2e}")
    assert diff.max() < 1e-4


def test_top_k_top_p_logprobs_are_of_the_truncated_distribution(gen, tiny_model, monkeypatch):
    """As HFBackend's ``sample_step``: log softmax over the kept tokens, renormalised."""
    monkeypatch.setattr(gen, "cfg", dataclasses.replace(gen.cfg, top_k=5, top_p=0.8))
    b = gen.generate(ITEMS, n_samples=4)
    attn = b.attention_mask()
    with torch.no_grad():  # the plain full forward pass, as a reference
        out = load_causal_lm(tiny_model)(
            input_ids=b.input_ids(), attention_mask=attn, position_ids=position_ids(attn)
        )
    p, t = b.prompt_ids.shape[1], b.response_ids.shape[1]
    logits = out.logits[:, p - 1 : p + t - 1] / TEMPERATURE
    scores = truncate(logits.flatten(0, 1).float(), 5, 0.8)
    expected = torch.log_softmax(scores, -1).gather(-1, b.response_ids.view(-1, 1))
    expected = expected.view_as(b.logprobs) * b.response_mask
    assert (expected - b.logprobs).abs().max() < 1e-4


def test_stop_strings_end_rows_as_on_the_hf_backend(gen, ray_local, tiny_model):
    """``rollout.stop`` on vLLM (an engine with vLLM's detokenizer, in an actor of its own):
    with the same seeds, each row is the stop-free row cut after the token that completes a
    stop string; the text is cut before it; the log-probs are the learner's."""
    from helpers.stops import check_stopped_rows, pick_stop

    from rlalign_ray.runtime.cluster import worker_env

    ray = ray_local
    free = gen.generate(ITEMS, n_samples=4, seed=3)
    stop = pick_stop(free.completions)
    cfg = RolloutConfig(max_new_tokens=8, temperature=TEMPERATURE, stop=[stop, "@@"], **ENGINE)
    actor = (
        ray.remote(Generator)
        .options(num_cpus=0.5, runtime_env={"env_vars": worker_env(cpu_only=True)})
        .remote(ModelConfig(path=tiny_model), cfg, seed=0)
    )
    try:
        b = ray.get(actor.generate.remote(ITEMS, 4, seed=3), timeout=600)
    finally:
        ray.kill(actor)
    check_stopped_rows(b, free, stop, gen.tok)
    assert (_learner_logprobs(load_causal_lm(tiny_model), b) - b.logprobs).abs().max() < 1e-4


def test_load_weights_in_buckets_switches_to_the_new_weights(gen, tiny_model, tmp_path):
    from rlalign_ray.models.tiny import build_tiny_model

    old = load_causal_lm(tiny_model)
    new, _ = build_tiny_model(str(tmp_path / "other"), seed=1)
    params = list(new.named_parameters())
    gen.backend.load_weights(params[:5])  # buckets, as a transport sends them
    gen.backend.load_weights(params[5:])
    gen.backend.finish_weight_update()
    after = gen.generate(ITEMS, n_samples=4)
    assert (_learner_logprobs(new, after) - after.logprobs).abs().max() < 1e-4
    assert (_learner_logprobs(old, after) - after.logprobs).abs().max() > 0.1
    gen.backend.load_weights(old.named_parameters())  # and back
    gen.backend.finish_weight_update()
    back = gen.generate(ITEMS, n_samples=4)
    assert (_learner_logprobs(old, back) - back.logprobs).abs().max() < 1e-4


def test_sleep_then_wake_weights_load_a_version_then_the_kv_cache(gen, tiny_model):
    """Sleep mode's order (level 2: nothing kept): wake the weights' memory, load a whole
    version, and only then the KV cache; generating in between is refused. On CPU vLLM's
    worker frees no memory, but the engine pauses and resumes as on a GPU."""
    engine = gen.backend.llm.llm_engine
    gen.backend.sleep()
    assert engine.is_sleeping()
    with pytest.raises(RuntimeError, match="asleep"):
        gen.generate(ITEMS, n_samples=2)
    gen.backend.wake_up()  # the weights' memory
    gen.backend.wake_up()  # a second wake changes nothing
    assert engine.is_sleeping()  # the KV cache still is
    with pytest.raises(RuntimeError, match="no full weight version loaded"):
        gen.generate(ITEMS, n_samples=2)
    params = list(load_causal_lm(tiny_model).named_parameters())
    gen.backend.load_weights(params[:5])
    assert engine.is_sleeping()
    gen.backend.load_weights(params[5:])
    gen.backend.finish_weight_update()  # the last bucket: the KV cache comes back
    assert not engine.is_sleeping()
    b = gen.generate(ITEMS, n_samples=4)
    assert (_learner_logprobs(load_causal_lm(tiny_model), b) - b.logprobs).abs().max() < 1e-4


# synchronous; and pipelined (k=1) with seeded chunks pulled by the engines
@pytest.mark.parametrize(
    "max_staleness,chunk_size", [(0, 0), pytest.param(1, 1, marks=pytest.mark.full)]
)
def test_loop_with_two_vllm_generators_two_reward_actors_two_ranks(
    ray_local, tiny_model, tmp_path, max_staleness, chunk_size
):
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path / "run"),
            rollout={
                "prompts_per_step": 4,
                "n_samples": 2,
                "max_new_tokens": 4,
                "num_actors": 2,
                "resources": {"num_cpus": 0.5},
                "chunk_size": chunk_size,
                "backend": "vllm",
                "vllm": VLLM,
            },
            learner={
                "world_size": 2,
                "zero_stage": 2,
                "micro_batch_size": 2,
                "lr": 1e-3,
                "resources": {"num_cpus": 0.5},
            },
            trainer={"steps": 3, "eval_every": 0, "max_staleness": max_staleness},
        )
    )
    final = Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["weights/version"] for r in rows] == [0, 1, 2, 3]
    # lr 1e-3 changes the weights every step: a generator still sampling with old weights
    # would show a large mismatch from step 2 on
    mismatch = [r["train/logprob_mismatch"] for r in rows[1:]]
    print(f"train/logprob_mismatch per step: {mismatch}")
    assert all(r["rollout/staleness_max"] <= max_staleness for r in rows[1:])
    if max_staleness == 0:
        assert all(m < 1e-3 for m in mismatch)
    assert final["weights/version"] == 3 and "eval/reward_mean" in rows[3]


@pytest.mark.full
@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_inflight_load_between_engine_steps(gen, tiny_model, tmp_path, kv):
    """In-flight updates (``generate`` with ``pause``): the engine driven step by step, a
    load between two steps, vLLM's weight-version spans as per-token versions; the same
    sequences go on, with the new weights' log-probs (recompute) or on the old KV (keep)."""
    from rlalign_ray.models.tiny import build_tiny_model
    from rlalign_ray.rollout.backend import SamplingParams

    load_at = 4  # the load happens before the engine's 4th step

    old = load_causal_lm(tiny_model)
    new, _ = build_tiny_model(str(tmp_path / "other"), seed=1)
    prompts = [gen.encode(p) for p in ("1+2=", "123+456=", "9+")]
    calls = []

    def pause() -> int:
        calls.append(len(calls))
        if len(calls) == load_at + 1:
            gen.backend.load_weights(list(new.named_parameters()))
            gen.backend.finish_weight_update()
        return int(len(calls) > load_at)

    gen.backend.recompute = kv == "recompute"
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    try:
        out = gen.backend.generate(prompts, params, n=4, pause=pause)
    finally:  # the old weights back for the next test
        gen.backend.load_weights(list(old.named_parameters()))
        gen.backend.finish_weight_update()
        gen.backend.recompute = True
    v = out.versions
    assert v.shape == out.tokens.shape == (12, 12)
    switch = int((v[0] == 0).sum())  # every request runs in every step: the same switch
    assert 0 < switch < 12 and v[:, :switch].eq(0).all() and v[:, switch:].eq(1).all()
    batch = gen._assemble(
        [PromptItem(i, "") for i in range(3)],
        [""] * 3,
        prompts,
        [(i, s) for i in range(3) for s in range(4)],
        out,
    )
    before = batch_logprobs(old, batch, 1.0, 64, torch.device("cpu"))
    after = batch_logprobs(new, batch, 1.0, 64, torch.device("cpu"))
    assert (before - out.logprobs)[:, :switch].abs().max() < 1e-4
    if kv == "recompute":  # preempted and recomputed: the new version's log-probs exactly
        assert (after - out.logprobs)[:, switch:].abs().max() < 1e-4
    else:  # the old KV blocks kept: neither version's
        assert (after - out.logprobs)[:, switch].abs().max() > 1e-3
