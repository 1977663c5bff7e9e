"""Multi-turn rollouts: episodes of an environment, generated turn by turn.

Each sample is an episode: ``env.reset(item)`` gives the first observation (the prompt),
then each turn the model generates an action (up to EOS, a stop string of ``env.stop``, or
``rollout.max_new_tokens``), ``env.step(action)`` answers, and the observation's tokens are
appended. Every turn, the actions of all live episodes are generated in one backend call
(episodes that ended drop out) and their ``step`` calls run concurrently.

The trajectory is prompt + [action tokens + observation tokens]*: the "response" of the
``RolloutBatch`` is everything after the prompt, with ``response_mask`` 1 on the tokens
the model generated (kept exactly as sampled: never decoded and re-encoded) and 0 on the
observation tokens (the observation text alone is tokenised). Behaviour log-probs are the
backend's, for every generated token. The backend gets each turn's whole context as token
ids, so the HF and vLLM backends both work unchanged. With in-flight weight updates
(``pause``) each generated token also records the weight version that sampled it; an
observation token, which no model sampled, records -1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from rlalign_ray.config import EnvConfig
from rlalign_ray.data.batch import PromptItem
from rlalign_ray.envs.base import EnvError, StepResult
from rlalign_ray.envs.host import LocalEnvs
from rlalign_ray.rollout.backend import GenerationBackend, SamplingParams


@dataclass
class Episode:
    """One sample's trajectory so far."""

    row: int  # row in the batch (prompt-major: samples of a prompt adjacent)
    item: PromptItem
    sample: int  # sample index within the prompt's group
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[float] = field(default_factory=list)  # 1.0 on generated tokens
    logprobs: list[float] = field(default_factory=list)  # behaviour log-probs (0 elsewhere)
    versions: list[int] = field(default_factory=list)  # in-flight updates: per token (-1: obs.)
    rewards: list[float] = field(default_factory=list)  # one per step
    turns: int = 0
    terminated: bool = False
    truncated: bool = False
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.tokens

    def name(self) -> str:
        return f"episode (prompt {self.item.index}, sample {self.sample})"


class MultiTurnRollout:
    """Runs a batch of episodes with a generation backend (see the module docstring).

    ``render(obs, first) -> str`` turns a message-list observation into text (the chat
    template; ``first``: the episode's first, which gets ``model.system_prompt``);
    ``envs`` is ``LocalEnvs`` or an actor pool's client with the same three methods.
    """

    def __init__(
        self,
        cfg: EnvConfig,
        backend: GenerationBackend,
        tokenizer: Any,
        encode: Any,
        render: Any,
        eos_ids: list[int],
        max_context: int,
        envs: Any = None,
    ):
        self.cfg, self.backend, self.tok = cfg, backend, tokenizer
        self.encode, self.render, self.eos_ids = encode, render, set(eos_ids)
        self.max_context = min(cfg.max_context_tokens or max_context, max_context)
        self.envs = envs or LocalEnvs(cfg)

    def run(
        self, items: list[PromptItem], n: int, params: SamplingParams, pause: Any = None
    ) -> list[Episode]:
        """The episodes of ``n`` samples of each item; ``pause`` goes to every turn's
        ``generate`` (in-flight weight updates)."""
        episodes = [
            Episode(row=i * n + s, item=it, sample=s)
            for i, it in enumerate(items)
            for s in range(n)
        ]
        try:
            first = self.envs.reset(episodes)
            for ep, obs in zip(episodes, first):
                ep.prompt_ids = self.encode(self.render(obs))
            for turn in range(self.cfg.max_turns):
                live = [ep for ep in episodes if not ep.done]
                if not live:
                    break
                seed = None if params.seed is None else params.seed + 1_000_003 * turn
                gen = self.backend.generate(
                    [ep.context for ep in live],
                    dataclasses.replace(params, seed=seed),
                    1,
                    **({"pause": pause} if pause is not None else {}),
                )
                actions = [self._take_action(ep, gen, i) for i, ep in enumerate(live)]
                results = self.envs.step(live, [a for a, _ in actions])
                for ep, (_, eos), result in zip(live, actions, results):
                    self._apply(ep, result, eos and not params.ignore_eos, params.max_new_tokens)
        finally:
            self.envs.close(episodes)
        return episodes

    def _take_action(self, ep: Episode, gen: Any, i: int) -> tuple[str, bool]:
        """Append row ``i``'s generated tokens (cut after a stop string) to ``ep``; returns
        the action text and whether it ended with EOS."""
        length = int(gen.lengths[i])
        toks = gen.tokens[i, :length].tolist()
        lps = gen.logprobs[i, :length].tolist()
        keep = stop_cut(self.tok, toks, self.cfg.stop)
        toks, lps = toks[:keep], lps[:keep]
        ep.tokens += toks
        ep.mask += [1.0] * len(toks)
        ep.logprobs += lps
        if gen.versions is not None:
            ep.versions += gen.versions[i, :keep].tolist()
        ep.turns += 1
        eos = bool(toks) and toks[-1] in self.eos_ids
        return self.tok.decode(toks, skip_special_tokens=True), eos

    def _apply(self, ep: Episode, result: Any, eos: bool, max_new_tokens: int) -> None:
        if not isinstance(result, StepResult):
            raise EnvError(
                f"environment {self.cfg.path} step of {ep.name()} returned "
                f"{type(result).__name__}; return an envs.StepResult"
            )
        ep.rewards.append(float(result.reward))
        if result.terminated or result.truncated or eos:
            ep.terminated = bool(result.terminated or (eos and not result.truncated))
            ep.truncated = bool(result.truncated)
            ep.done = True
            return
        if ep.turns >= self.cfg.max_turns:  # no action follows: the episode is cut here
            ep.truncated = ep.done = True
            return
        obs = result.observation
        ids = self.tok(
            self.render(obs, False) if isinstance(obs, list) else obs, add_special_tokens=False
        )["input_ids"]
        if len(ep.context) + len(ids) + max_new_tokens > self.max_context:
            ep.truncated = ep.done = True  # the next action would not fit the context
            return
        ep.tokens += ids
        ep.mask += [0.0] * len(ids)
        ep.logprobs += [0.0] * len(ids)
        ep.versions += [-1] * len(ids)


def stop_cut(tok: Any, tokens: list[int], stops: list[str]) -> int:
    """How many of ``tokens`` to keep: up to the token that completes the first stop
    string (all of them when none appears). The tokens are never re-encoded."""
    if not stops or not tokens:
        return len(tokens)
    text = tok.decode(tokens, skip_special_tokens=True)
    if not any(s in text for s in stops):
        return len(tokens)
    for k in range(1, len(tokens) + 1):
        prefix = tok.decode(tokens[:k], skip_special_tokens=True)
        if any(s in prefix for s in stops):
            return k
    return len(tokens)


def episode_return(rewards: list[float], mode: str) -> float:
    """The environment's part of an episode's reward (``env.reward``).

    >>> episode_return([0.5, 0.0, 1.0], "sum"), episode_return([0.5, 0.0, 1.0], "last")
    (1.5, 1.0)
    >>> episode_return([0.5], "rewards-only")
    0.0
    """
    if mode == "rewards-only" or not rewards:
        return 0.0
    return float(sum(rewards)) if mode == "sum" else float(rewards[-1])


def episodes_tensors(
    episodes: list[Episode], pad_id: int, versions: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) response tensors of finished episodes (with ``versions`` also
    ``token_versions``, -1 on padding and observations)."""
    width = max(max((len(ep.tokens) for ep in episodes), default=0), 1)
    b = len(episodes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width)
    lps = torch.zeros(b, width)
    vers = torch.full((b, width), -1, dtype=torch.long)
    for i, ep in enumerate(episodes):
        t = len(ep.tokens)
        if t:
            ids[i, :t] = torch.tensor(ep.tokens, dtype=torch.long)
            mask[i, :t] = torch.tensor(ep.mask)
            lps[i, :t] = torch.tensor(ep.logprobs)
            if versions:
                vers[i, :t] = torch.tensor(ep.versions, dtype=torch.long)
    out = {
        "response_ids": ids,
        "response_len": torch.tensor([len(ep.tokens) for ep in episodes], dtype=torch.long),
        "response_mask": mask,
        "logprobs": lps,
        "truncated": torch.tensor([ep.truncated for ep in episodes]),
    }
    if versions:
        out["token_versions"] = vers
    return out
