"""The generator: a policy copy that samples responses for a shard of prompts.

A plain class; ``pools/generator.py`` runs it as Ray actors (``runtime/placement.py`` makes them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlalign_ray.checkpoint import rng_state, set_rng_state
from rlalign_ray.config import EnvConfig, ModelConfig, RolloutConfig
from rlalign_ray.data.batch import PromptItem, RolloutBatch, pad_prompts
from rlalign_ray.data.render import PromptRenderer
from rlalign_ray.envs.host import RemoteEnvs
from rlalign_ray.errors import ConfigError
from rlalign_ray.models.loading import load_tokenizer, set_threads
from rlalign_ray.rollout.backend import SamplingParams, backend_class, cut_at_stop
from rlalign_ray.rollout.inflight import (
    EngineThread,
    LoadGate,
    StaleWeightsError,
    version_summary,
)
from rlalign_ray.rollout.multiturn import MultiTurnRollout, episode_return, episodes_tensors
from rlalign_ray.sync.buckets import SyncPlan
from rlalign_ray.sync.transports import WeightHandle, WeightTransport, make_transport

ENV_REWARD = "env_reward"  # RolloutBatch column: the environment's part of the reward


class Generator:
    def __init__(
        self,
        model: ModelConfig,
        rollout: RolloutConfig,
        seed: int,
        rank: int = 0,
        max_prompt_tokens: int = 512,
        env: EnvConfig | None = None,
    ):
        set_threads(rollout.resources.num_cpus)
        torch.manual_seed(seed * 1000 + rank)
        self.cfg = rollout
        self.chat_template = model.chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self.tok = load_tokenizer(model.tokenizer or model.path, model.trust_remote_code)
        self.renderer = PromptRenderer(
            self.tok,
            model.chat_template,
            model.chat_template_kwargs,
            max_prompt_tokens,
            model.system_prompt,
        )
        self.env = env if env is not None and env.path else None
        # rollout.inflight_updates: loads come in the actor's other thread and are applied
        # between two decode steps of the chunk in progress; one thread of its own runs the
        # backend: built, sampled and loaded there (rollout/inflight.py)
        self.gate = LoadGate() if rollout.inflight_updates else None
        self.engine = EngineThread() if rollout.inflight_updates else None
        self.inflight_loads = 0  # versions loaded during the last generate call
        # multi-turn contexts grow past the prompt: let the engine take the model's length
        context = max_prompt_tokens if self.env is None else 1 << 30
        self.backend = self._on_engine(self._build_backend, model, rollout, context)
        self.multiturn = None  # built on first use (rollout/multiturn.py)
        self._env_client = None  # an environment pool's client (set_env_actors)
        self.transport: WeightTransport | None = None  # set by join_weight_sync
        self.in_engine = False  # the backend's workers receive the weights themselves
        self.version = 0
        self.rank = rank

    def _build_backend(self, model: ModelConfig, rollout: RolloutConfig, context: int) -> Any:
        cls = backend_class(rollout.backend)
        if rollout.inflight_updates and not cls.inflight_updates:
            raise ConfigError(
                [f"rollout.inflight_updates: the {rollout.backend} backend cannot load weights "
                 "between decode steps; turn inflight_updates off"]
            )  # fmt: skip
        set_threads(rollout.resources.num_cpus)  # per thread: again in the engine's
        return cls(model, rollout, self.tok, context)

    def _on_engine(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the engine thread (in-flight updates), else here."""
        return self.engine.run(fn, *args) if self.engine is not None else fn(*args)

    # ---- prompts ----------------------------------------------------------------------
    def render(self, prompt: Any, first: bool = True) -> str:
        """The text the model sees: the chat template for message lists (or when asked);
        ``first=False`` for an environment's later observations (no system prompt)."""
        return self.renderer.render(prompt, first)

    def encode(self, text: str) -> list[int]:
        """Its tokens: one BOS, at most ``max_prompt_tokens`` (the last ones; the driver has
        already applied ``data.truncation`` to the dataset)."""
        return self.renderer.encode(text)

    # ---- sampling ---------------------------------------------------------------------
    def generate(
        self,
        items: list[PromptItem],
        n_samples: int,
        greedy: bool = False,
        expected_version: int | None = None,
        seed: int | None = None,
    ) -> RolloutBatch:
        """``n_samples`` responses per prompt, samples of one prompt adjacent.

        With ``expected_version``, refuses to sample with other weights (in-flight updates:
        waits for that version's load, sent to the other thread, and accepts a newer one).
        With ``seed``, the samples depend only on it (not on what this actor sampled
        before), so a chunk gives the same samples whichever actor runs it.
        """
        if self.gate is None and expected_version not in (None, self.version):
            raise StaleWeightsError(
                f"generator {self.rank} holds weight version {self.version}, the driver expects "
                f"{expected_version}; refusing to sample with stale weights"
            )
        c = self.cfg
        params = SamplingParams(
            max_new_tokens=c.max_new_tokens,
            temperature=c.eval_temperature if greedy else c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            ignore_eos=c.ignore_eos,
            seed=seed,
            stop=tuple(c.stop),
        )
        if self.gate is None:
            return self._sample(items, n_samples, params, {})
        with self.gate.sampling(expected_version) as run:  # in the engine thread, pausing
            pause = {"pause": self.gate.between_steps}  # between decode steps for loads
            batch = self.engine.run(self._sample, items, n_samples, params, pause)
        self.inflight_loads = run.loads
        return batch

    def _sample(self, items, n_samples, params, pause: dict[str, Any]) -> RolloutBatch:
        if self.env is not None:
            return self._episodes(items, n_samples, params, pause)
        texts = [self.render(it.prompt) for it in items]
        encoded = [self.encode(t) for t in texts]
        rows = [(i, s) for i in range(len(items)) for s in range(n_samples)]
        gen = self.backend.generate(encoded, params, n_samples, **pause)
        return self._assemble(items, texts, encoded, rows, gen)

    def generate_chunk(
        self,
        items: list[PromptItem],
        n_samples: int,
        greedy: bool = False,
        expected_version: int | None = None,
        seed: int | None = None,
    ) -> tuple[RolloutBatch, dict[str, Any]]:
        """``generate``, plus a small summary the driver reads without fetching the batch
        (``GeneratorPool`` calls this with ``num_returns=2``)."""
        import time

        t0 = time.perf_counter()
        batch = self.generate(items, n_samples, greedy, expected_version, seed)
        info = {
            "version": batch.version,
            "rows": len(batch),
            "tokens": int(batch.response_len.sum()),
            "seconds": time.perf_counter() - t0,
        }
        if self.gate is not None:  # per row: its tokens' versions (rollout/version_lag_mean)
            info["inflight_loads"] = self.inflight_loads
            info["token_versions"] = version_summary(batch.token_versions, batch.response_mask)
        return batch, info

    def _assemble(self, items, texts, encoded, rows, gen) -> RolloutBatch:
        pad = self.tok.pad_token_id
        prompt_ids, prompt_mask = pad_prompts([encoded[i] for i, _ in rows], pad)
        tokens, logprobs, lengths = gen.tokens, gen.logprobs, gen.lengths
        t = tokens.shape[1]
        mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
        completions = self.tok.batch_decode(tokens, skip_special_tokens=True)
        if self.cfg.stop:  # the tokens keep the stop string (trained on); the text does not
            completions = [
                cut_at_stop(t, self.cfg.stop, self.cfg.include_stop_str_in_output)
                for t in completions
            ]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=tokens,
            response_len=lengths,
            response_mask=mask,
            logprobs=logprobs,
            version=self._oldest(gen.versions, mask),
            group_ids=torch.tensor([items[i].index for i, _ in rows], dtype=torch.long),
            prompts=[texts[i] for i, _ in rows],
            completions=completions,
            columns={k: [items[i].columns[k] for i, _ in rows] for k in items[0].columns},
            pad_id=pad,
            truncated=gen.truncated,
            raw_prompts=[items[i].prompt for i, _ in rows],
            token_versions=gen.versions,
        )

    def _oldest(self, versions: torch.Tensor | None, mask: torch.Tensor) -> int:
        """The batch's version: the oldest of its sampled tokens' (in-flight updates), else
        the one version held."""
        if versions is None:
            return self.version
        sampled = versions[mask > 0]
        return int(sampled.min()) if sampled.numel() else self.version

    # ---- multi-turn (env.path) -----------------------------------------------------------
    def set_env_actors(self, actors: list[Any]) -> None:
        """Step episodes in an environment pool's actors (``pools/env.py``) instead of
        in this process."""
        self.multiturn = None
        self._env_client = RemoteEnvs(self.env, actors, self.rank)

    def _episodes(
        self, items: list[PromptItem], n: int, params: SamplingParams, pause: dict[str, Any]
    ) -> RolloutBatch:
        if self.multiturn is None:
            self.multiturn = MultiTurnRollout(
                self.env,
                self.backend,
                self.tok,
                self.encode,
                self.render,
                self.backend.eos_ids,
                self.backend.max_context(),
                self._env_client,
            )
        episodes = self.multiturn.run(items, n, params, **pause)
        pad = self.tok.pad_token_id
        prompt_ids, prompt_mask = pad_prompts([ep.prompt_ids for ep in episodes], pad)
        t = episodes_tensors(episodes, pad, versions=bool(pause))
        columns = {k: [ep.item.columns[k] for ep in episodes] for k in items[0].columns}
        columns[ENV_REWARD] = [episode_return(ep.rewards, self.env.reward) for ep in episodes]
        columns["env_turns"] = [ep.turns for ep in episodes]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            version=self._oldest(t.get("token_versions"), t["response_mask"]),
            group_ids=torch.tensor([ep.item.index for ep in episodes], dtype=torch.long),
            prompts=self.tok.batch_decode(prompt_ids, skip_special_tokens=True),
            completions=self.tok.batch_decode(t["response_ids"], skip_special_tokens=True),
            columns=columns,
            pad_id=pad,
            **t,
        )

    # ---- weights ----------------------------------------------------------------------
    def weight_ranks(self) -> int:
        """Ranks this generator takes in a collective weight sync (its engine's workers')."""
        return self.backend.weight_ranks

    def join_weight_sync(self, plan: SyncPlan, address: Any, rank: int) -> None:
        """Build this generator's end of the weight transport (``rank``: its first rank in
        the sync); a backend that can receives in its engine's workers instead."""
        if self.transport:
            self.transport.close()
        self.transport = make_transport(plan)
        who = f"generator {self.rank}"
        self.in_engine = self._on_engine(
            self.backend.join_weight_sync, self.transport, address, rank, who
        )
        if not self.in_engine:
            self.transport.connect(address, rank)
        if self.gate is not None:
            self.gate.timeout_s = plan.timeout_s

    def load_weights(self, handle: WeightHandle) -> int:
        """Load one bucket; returns the version now held (-1 while a version is half in).
        In-flight updates: this runs in the actor's ``weights`` thread, waits for the
        bucket's publish first, then loads it between two decode steps of the chunk in
        progress (or at once when none is)."""
        if self.gate is None:
            return self._receive(handle)
        handle = handle.resolve()  # the learner's publish, waited for before pausing anyone
        return self.gate.load(lambda: self.engine.run(self._receive, handle))

    def _receive(self, handle: WeightHandle) -> int:
        if self.in_engine:
            self.backend.receive_weights(handle)
        else:
            self.transport.receive(handle, self.backend)
        self.version = handle.version if handle.is_last(self.transport.plan) else -1
        return self.version

    # ---- GPU colocation (a backend that sleeps, e.g. rollout.vllm.enable_sleep_mode) ---------------------------
    def sleep(self) -> None:
        """Free the engine's GPU memory (weights, KV cache) while the learner trains."""
        self.backend.sleep()

    def wake_up(self) -> None:
        """Take the GPU memory back before the next weight load and generation."""
        self.backend.wake_up()

    # ---- resumable checkpoints ----------------------------------------------------------
    def get_rng_state(self) -> dict[str, Any]:
        """This actor's random states (unseeded chunks sample from its own stream)."""
        return rng_state()

    def set_rng_state(self, state: dict[str, Any]) -> None:
        set_rng_state(state)

    def get_version(self) -> int:
        return self.version

    def get_weights(self) -> dict[str, np.ndarray]:
        """Every parameter as a numpy array (for tests and debugging)."""
        return {n: p.detach().cpu().float().numpy() for n, p in self.backend.named_parameters()}

    def ping(self) -> int:
        return self.rank
