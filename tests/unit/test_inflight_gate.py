"""In-flight weight updates without Ray: the gate between the sampling thread and a load,
the HF backend continuing the same sequences across a load (per-token versions, log-probs
of the new weights), and a generator whose load arrives from another thread mid-chunk."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from rlalign_ray.config import ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem, RolloutBatch, pad_prompts
from rlalign_ray.errors import ActorFailure
from rlalign_ray.models.loading import load_causal_lm, position_ids
from rlalign_ray.rollout.backend import SamplingParams
from rlalign_ray.rollout.generator import Generator
from rlalign_ray.rollout.inflight import LoadGate, version_summary

K = 3  # the load happens before decode step K


def _wait(gate: LoadGate, predicate) -> None:
    """Until ``predicate(gate)`` holds (the gate's own condition; no sleeping)."""
    with gate._cond:
        assert gate._cond.wait_for(lambda: predicate(gate), timeout=30)


# ---- the gate --------------------------------------------------------------------------
def test_a_load_waits_for_a_step_boundary_and_the_sampler_for_the_whole_version():
    gate, applied = LoadGate(timeout_s=30), []

    def bucket(b: int, version: int):
        return lambda: applied.append(b) or version

    def loads():  # two buckets of version 1, as the actor's weights thread gets them
        gate.load(bucket(0, -1))
        gate.load(bucket(1, 1))

    with gate.sampling(0) as run:
        assert run.version == 0
        loader = threading.Thread(target=loads)
        loader.start()
        _wait(gate, lambda g: g._waiting == 1)
        assert applied == []  # a decode step may be running: the load waits
        assert gate.between_steps() == 1  # parked until the version's last bucket is in
        assert applied == [0, 1]
        loader.join(10)
    assert run.loads == 1
    gate.load(bucket(2, 2))  # nobody samples: at once
    assert applied == [0, 1, 2] and gate.version == 2


def test_a_chunk_waits_for_the_expected_version_and_accepts_a_newer_one():
    gate = LoadGate(timeout_s=30)
    started = []
    sampler = threading.Thread(target=lambda: started.append(gate.begin(expected=1)))
    sampler.start()
    _wait(gate, lambda g: g._cond._waiters)  # the chunk waits for version 1's load
    gate.load(lambda: 1)
    sampler.join(10)
    assert started == [1]
    gate.end()
    gate.load(lambda: 2)
    with gate.sampling(1) as run:  # a later load arrived first: sampled with 2, recorded
        assert run.version == 2


def test_a_failed_load_stops_the_generation_in_progress():
    gate = LoadGate(timeout_s=30)

    def fail():
        raise RuntimeError("bucket lost")

    with pytest.raises(ActorFailure, match="bucket lost"):
        with gate.sampling(0):
            loader = threading.Thread(target=lambda: pytest.raises(RuntimeError, gate.load, fail))
            loader.start()
            _wait(gate, lambda g: g._waiting == 1)
            gate.between_steps()
    loader.join(10)


def test_version_summary_counts_sampled_tokens_only():
    versions = torch.tensor([[3, 3, 4, -1], [4, 5, -1, -1], [-1, -1, -1, -1]])
    mask = (versions >= 0).float()
    s = version_summary(versions, mask)
    assert s == {"oldest": [3, 4, -1], "sum": [10, 9, 0], "tokens": [3, 2, 0]}


# ---- the HF backend across a load ------------------------------------------------------
@pytest.fixture(scope="module")
def new_model(tiny_model, tmp_path_factory):
    from rlalign_ray.models.tiny import build_tiny_model

    model, _ = build_tiny_model(str(tmp_path_factory.mktemp("other")), seed=1)
    return model.eval()


def _direct_logprobs(model, prompts, n, tokens, pad, upto=None, cache=None):
    """Log-probs of ``tokens`` after their prompts by one plain forward pass."""
    ids, mask = pad_prompts([p for p in prompts for _ in range(n)], pad)
    full = torch.cat([ids, tokens], dim=1)
    attn = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attn, position_ids=position_ids(attn)).logits
    p = ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : -1].float(), dim=-1)
    return logp.gather(-1, tokens[..., None])[..., 0]


def _kept_cache_logprob(old, new, prompts, n, tokens, pad):
    """Step K's log-prob as ``inflight_kv: keep`` computes it: the old weights' KV cache of
    the prompt and tokens before K - 1, then token K - 1 through the new weights."""
    from transformers import DynamicCache

    ids, mask = pad_prompts([p for p in prompts for _ in range(n)], pad)
    full = torch.cat([ids, tokens[:, :K]], dim=1)
    attn = torch.cat([mask, torch.ones_like(tokens[:, :K])], dim=1)
    pos, cache, cut = position_ids(attn), DynamicCache(), full.shape[1] - 1
    with torch.no_grad():
        old(input_ids=full[:, :cut], attention_mask=attn[:, :cut], position_ids=pos[:, :cut],
            past_key_values=cache, use_cache=True)  # fmt: skip
        logits = new(input_ids=full[:, cut:], attention_mask=attn, position_ids=pos[:, cut:],
                     past_key_values=cache, use_cache=True).logits  # fmt: skip
    return torch.log_softmax(logits[:, -1].float(), -1).gather(-1, tokens[:, K, None])[:, 0]


@pytest.mark.parametrize("kv", ["recompute", "keep"])
def test_hf_backend_continues_the_same_sequences_with_the_new_weights(tiny_model, new_model, kv):
    g = Generator(ModelConfig(path=tiny_model), RolloutConfig(inflight_kv=kv), seed=0)
    old, pad = load_causal_lm(tiny_model).eval(), g.tok.pad_token_id
    prompts, n = [g.encode("12+34="), g.encode("5+")], 2
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, seed=3)
    plain = g.backend.generate(prompts, params, n)  # the same seed, no load
    steps = []

    def pause() -> int:  # where the gate would let a load in: before step K
        steps.append(len(steps))
        if len(steps) == K + 1:
            g.backend.load_weights(new_model.named_parameters())
            g.backend.finish_weight_update()
        return int(len(steps) > K)

    out = g.backend.generate(prompts, params, n, pause=pause)
    assert out.versions[:, :K].eq(0).all() and out.versions[:, K:].eq(1).all()
    assert torch.equal(out.tokens[:, :K], plain.tokens[:, :K])  # the same sequences go on
    before = _direct_logprobs(old, prompts, n, out.tokens, pad)
    after = _direct_logprobs(new_model, prompts, n, out.tokens, pad)
    assert torch.allclose(out.logprobs[:, :K], before[:, :K], atol=1e-5)
    if kv == "recompute":  # every later token exactly as the new version samples it
        assert torch.allclose(out.logprobs[:, K:], after[:, K:], atol=1e-5)
    else:  # the old weights' cache, the new weights on top
        kept = _kept_cache_logprob(old, new_model, prompts, n, out.tokens, pad)
        assert torch.allclose(out.logprobs[:, K], kept, atol=1e-5)
        assert not torch.allclose(out.logprobs[:, K], after[:, K], atol=1e-3)


def test_rollout_batch_keeps_token_versions_through_select_and_concat():
    def batch(version, versions):
        t = torch.tensor(versions)
        return RolloutBatch(
            prompt_ids=torch.ones(len(t), 1, dtype=torch.long),
            prompt_mask=torch.ones(len(t), 1, dtype=torch.long),
            response_ids=torch.ones_like(t),
            response_len=(t >= 0).sum(1),
            response_mask=(t >= 0).float(),
            logprobs=torch.zeros(t.shape),
            version=version,
            group_ids=torch.arange(len(t)),
            prompts=[""] * len(t),
            completions=[""] * len(t),
            columns={},
            token_versions=t,
        )

    a = batch(2, [[2, 3, -1], [2, 2, 2]])
    plain = dataclasses.replace(batch(4, [[4, -1, -1], [4, 4, -1]]), token_versions=None)
    joined = RolloutBatch.concat([a, plain])
    assert joined.version == 2
    assert joined.token_versions.tolist() == [[2, 3, -1], [2, 2, 2], [4, -1, -1], [4, 4, -1]]
    assert joined.select([1, 2]).trimmed().token_versions.tolist() == [[2, 2, 2], [4, -1, -1]]


# ---- a generator whose load comes from another thread ------------------------------------
def _sync_pair(transport: str, g: Generator, new_model) -> tuple[object, list]:
    """A sender for ``g`` over ``transport`` with new_model's weights published in buckets
    (collective: broadcasts queued on the sender's thread, joined by g's loads); returns the
    sender and each bucket's payload."""
    from rlalign_ray.sync.buckets import plan_buckets
    from rlalign_ray.sync.plan import SyncPlan
    from rlalign_ray.sync.transports import CollectiveTransport, SharedMemoryTransport

    layout = [(name, tuple(p.shape)) for name, p in new_model.named_parameters()]
    buckets = plan_buckets(layout, torch.float32, 64 * 1024)
    assert len(buckets) > 2
    overlap = transport == "collective"
    plan = SyncPlan(transport, "gloo", "float32", buckets, 30.0, 2, overlap=overlap)
    sender = (CollectiveTransport if overlap else SharedMemoryTransport)(plan)
    address = sender.open()
    joining = threading.Thread(target=g.join_weight_sync, args=(plan, address, 1))
    joining.start()  # the collective group's rendezvous needs both ends
    sender.connect(address, 0)
    joining.join(30)
    params = dict(new_model.named_parameters())
    sent = [sender.send(b, [params[n] for n in b_.names]) for b, b_ in enumerate(buckets)]
    return sender, [None if overlap else [slot] for slot in sent]


@pytest.mark.parametrize("transport", ["shared_memory", "collective"])
def test_generator_loads_mid_chunk_from_another_thread(tiny_model, new_model, transport):
    """The actor's threads without Ray: a chunk samples while the weights thread loads
    version 1 bucket by bucket (shared memory: HF shares the slot; collective over gloo:
    each broadcast joined inside the pause); the chunk goes on with it."""

    cfg = RolloutConfig(max_new_tokens=200, ignore_eos=True, inflight_updates=True)
    g = Generator(ModelConfig(path=tiny_model), cfg, seed=0)
    sender, payloads = _sync_pair(transport, g, new_model)

    loader = _load_at_step(g, payloads, 3)  # once the chunk is a few decode steps in
    batch, info = g.generate_chunk([PromptItem(0, "1+2=")], 2, expected_version=0)
    loader.join(30)
    sender.close()
    v = batch.token_versions
    assert info["inflight_loads"] == 1 and info["version"] == batch.version == 0
    assert v[:, 0].eq(0).all() and v[:, -1].eq(1).all()  # started with 0, finished with 1
    assert (v[:, 1:] >= v[:, :-1]).all()  # one switch, at the same step in every row
    assert info["token_versions"]["tokens"] == [200, 200]
    assert g.get_version() == 1
    held = dict(g.backend.named_parameters())
    assert all(torch.equal(held[n], p) for n, p in new_model.named_parameters())


def _load_at_step(g, payloads: list, steps: int) -> threading.Thread:
    """A thread that loads version 1 (``payloads``, one per bucket) into ``g`` once its
    generation has begun decode step ``steps``."""
    from rlalign_ray.sync.transports import WeightHandle

    def load():
        _wait(g.gate, lambda gate: gate._sampling and gate.steps >= steps)
        for b, payload in enumerate(payloads):
            g.load_weights(WeightHandle(1, b, payload))

    loader = threading.Thread(target=load)
    loader.start()
    return loader


def test_multiturn_episode_records_versions_on_generated_tokens_only(tiny_model, new_model):
    """A load during an episode's second turn: its generated tokens switch from 0 to 1, the
    observation tokens (no model sampled them) and the padding record -1."""
    from rlalign_ray.config import EnvConfig

    cfg = RolloutConfig(max_new_tokens=16, ignore_eos=True, inflight_updates=True)
    env = EnvConfig(path="helpers.envs:EchoEnv", max_turns=3)
    g = Generator(ModelConfig(path=tiny_model), cfg, seed=0, env=env)
    sender, payloads = _sync_pair("shared_memory", g, new_model)

    loader = _load_at_step(g, payloads, 20)  # in the second turn (16 decode steps a turn)
    batch, info = g.generate_chunk([PromptItem(0, "1+2=")], 2, expected_version=0)
    loader.join(30)
    sender.close()
    v, sampled = batch.token_versions, batch.response_mask > 0
    assert (v[~sampled] == -1).all() and info["inflight_loads"] == 1
    for row in v:
        generated = row[row >= 0].tolist()
        assert len(generated) == 48 and generated[:16] == [0] * 16 and generated[-1] == 1
        assert generated == sorted(generated)
    assert batch.version == 0


def test_config_needs_pipelining_and_no_dispatchers():
    from rlalign_ray.config import config_from_dict
    from rlalign_ray.errors import ConfigError

    reward = [{"type": "function", "path": "rlalign_ray.rewards.builtin:arithmetic_exact"}]
    raw = {"reward": {"rewards": reward}, "rollout": {"inflight_updates": True}}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**raw, "rollout": {"inflight_updates": True, "dispatch_group": 2}})
    problems = " ".join(err.value.problems)
    assert "rollout.inflight_updates" in problems and "trainer.max_staleness >= 1" in problems
    assert "rollout.dispatch_group: 0" in problems
    assert config_from_dict({**raw, "trainer": {"max_staleness": 1}}).rollout.inflight_updates


def test_simulated_generator_goes_on_with_a_load_mid_chunk():
    """The bench's simulated generator (``bench pipeline --simulate --inflight-updates``):
    a long chunk lets the load in between two decode steps and goes on with it."""
    from rlalign_ray.bench.simulated import SimulatedGenerator, Workload
    from rlalign_ray.sync.plan import SyncPlan, WeightHandle

    work = Workload(gen_s=0.4, batch_rows=4, generators=1, tokens=20)  # 0.1 s a row
    cls = type("SimulatedGenerator", (SimulatedGenerator,), {"work": work})
    gen = cls(None, RolloutConfig(inflight_updates=True), 0)
    gen.join_weight_sync(SyncPlan("object_store", "gloo", "float32", ((),), 30.0, 2), None, 1)
    loader = threading.Thread(
        target=lambda: (
            _wait(gen.gate, lambda g: g._sampling and g.steps >= 5),
            gen.load_weights(WeightHandle(1, 0)),
        )
    )
    loader.start()
    rollout, info = gen.generate_chunk([PromptItem(0, "p")], 2, expected_version=0)
    loader.join(10)
    assert rollout.version == info["version"] == 0 and info["inflight_loads"] == 1
    summary = info["token_versions"]
    assert all(0 < s < n for s, n in zip(summary["sum"], summary["tokens"]))  # 0s, then 1s
