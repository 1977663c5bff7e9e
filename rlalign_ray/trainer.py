"""The driver: ``Trainer(config).fit()``.

Each step: sample prompts, generate (shards across the generator pool), score each shard
as it lands (reward pool) and take its reference log-probs, compute advantages, update the
policy (learner group), broadcast the new weights. Synchronous: every generator holds the
learner's latest version before it samples again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from rlalign_ray.algorithms import outcome_advantages
from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem, ScoredShard
from rlalign_ray.data.prompts import PromptSampler, load_prompts
from rlalign_ray.errors import ActorFailure
from rlalign_ray.logger import MetricsLogger
from rlalign_ray.runtime.cluster import connect
from rlalign_ray.runtime.pools import get, start_pools, stop_pools
from rlalign_ray.runtime.roles import build_roles, cpus_needed

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.version = 0  # weight version the generators hold
        self.pools: dict[str, Any] = {}
        self._started_ray = False

    # ---- the algorithm ----------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        train = load_prompts(cfg.data.train, cfg.data.prompt_key)
        evals = load_prompts(cfg.data.eval, cfg.data.prompt_key, cfg.data.eval_limit) if cfg.data.eval else []
        sampler = PromptSampler(train, cfg.run.seed)
        self.start()
        logger = MetricsLogger(cfg.trainer.output_dir, cfg.trainer.steps, cfg.trainer.tensorboard,
                               cfg.trainer.progress_bar)
        last: dict[str, float] = {}
        try:
            if evals:
                last = self.evaluate(evals)
                logger.log(0, {**last, "weights/version": self.version})
            for step in range(1, cfg.trainer.steps + 1):
                t0 = time.perf_counter()
                # 1. sample prompts
                prompts = sampler.next(cfg.rollout.prompts_per_step)
                # 2. generate; 3. score and reference log-probs, per shard as it lands
                shards, scored, ref_lp, times = self.rollout(prompts)
                # 4. advantages
                scores = ScoredShard.concat(get(scored, "reward pool", cfg.run.call_timeout_s))
                adv = outcome_advantages(cfg.algorithm.name, scores.scores, scores.group_ids,
                                         scores.response_mask)
                # 5. update the policy
                t = time.perf_counter()
                learner = self.learn(shards, adv, ref_lp, step)
                times["time/train_s"] = time.perf_counter() - t
                # 6. broadcast the new weights
                t = time.perf_counter()
                times["weights/bytes"] = self.broadcast(self.version + 1)
                times["time/sync_s"] = time.perf_counter() - t
                metrics = {**rollout_metrics(scores, "train"), **learner, **times,
                           "weights/version": self.version}
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 or step == cfg.trainer.steps:
                    metrics.update(self.evaluate(evals) if evals else {})
                if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                    self.save(Path(cfg.trainer.output_dir) / "checkpoints" / f"step_{step}")
                metrics["time/step_s"] = time.perf_counter() - t0
                logger.log(step, metrics)
                logger.advance()
                last = metrics
            self.save(Path(cfg.trainer.output_dir) / "final")
        finally:
            logger.close()
            self.stop()
        return last

    # ---- the pieces -------------------------------------------------------------------
    def rollout(self, prompts: list[PromptItem], greedy: bool = False):
        """Shard prompts across generators; score each shard (and get reference log-probs)
        as soon as it is ready, feeding the refs straight to the reward pool."""
        import ray

        gens = self.pools["generator"].actors
        rewards = self.pools["reward"].actors
        ref = self.pools.get("reference")
        n = 1 if greedy else self.cfg.rollout.n_samples
        t0 = time.perf_counter()
        shards = [g.generate.remote(chunk, n, greedy)
                  for g, chunk in zip(gens, split(prompts, len(gens))) if chunk]
        scored: dict[Any, Any] = {}
        ref_lp: dict[Any, Any] = {}
        pending = list(shards)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.cfg.run.call_timeout_s)
            if not done:
                raise ActorFailure(f"generation did not finish within {self.cfg.run.call_timeout_s}s")
            for r in done:
                scored[r] = rewards[len(scored) % len(rewards)].score.remote(r)
                if ref is not None and not greedy:
                    ref_lp[r] = ref.actors[0].logprobs.remote(r)
        get(shards, "generator pool", self.cfg.run.call_timeout_s)  # surfaces generator errors
        t_gen = time.perf_counter() - t0
        times = {"time/generate_s": t_gen}
        if not greedy:
            get(list(scored.values()), "reward pool", self.cfg.run.call_timeout_s)
            times["time/reward_s"] = time.perf_counter() - t0 - t_gen  # the part not overlapped
        return shards, [scored[s] for s in shards], ([ref_lp[s] for s in shards] if ref_lp else None), times

    def learn(self, shards: list[Any], adv: torch.Tensor, ref_lp: list[Any] | None, step: int) -> dict[str, float]:
        ranks = self.pools["learner"].actors
        out = get([r.train_step.remote(shards, adv, ref_lp, step) for r in ranks], "learner group",
                  self.cfg.run.call_timeout_s)
        return {f"train/{k}": v for k, v in out[0].items()}

    def broadcast(self, version: int) -> int:
        """Learner rank 0 publishes once; every generator loads it and reports the version."""
        handles = get([r.publish_weights.remote(version) for r in self.pools["learner"].actors],
                      "weight publish", self.cfg.run.call_timeout_s)
        handle = handles[0]
        versions = get([g.load_weights.remote(handle) for g in self.pools["generator"].actors],
                       "weight broadcast", self.cfg.run.call_timeout_s)
        if any(v != version for v in versions):
            raise ActorFailure(f"weight broadcast: generators report versions {versions}, expected {version}")
        self.version = version
        return handle.num_bytes

    def evaluate(self, evals: list[PromptItem]) -> dict[str, float]:
        shards, scored, _, times = self.rollout(evals, greedy=True)
        scores = ScoredShard.concat(get(scored, "reward pool (eval)", self.cfg.run.call_timeout_s))
        return {**rollout_metrics(scores, "eval"), "time/eval_s": times["time/generate_s"]}

    def save(self, path: Path) -> None:
        get([r.save_pretrained.remote(str(path)) for r in self.pools["learner"].actors],
            f"saving {path}", self.cfg.run.call_timeout_s)

    # ---- actors -----------------------------------------------------------------------
    def start(self) -> None:
        roles = build_roles(self.cfg)
        self._started_ray = connect(self.cfg.run, cpus_needed(roles))
        self.pools = start_pools(roles, self.cfg.run.placement_timeout_s)
        ranks = self.pools["learner"].actors
        timeout = self.cfg.run.call_timeout_s
        addr, port = get(ranks[0].address.remote(), "learner rank 0", timeout)
        get([r.setup.remote(addr, port) for r in ranks], "learner setup", timeout)
        for name, pool in self.pools.items():
            if name != "learner":
                get([a.ping.remote() for a in pool.actors], f"{name} start-up", timeout)

    def stop(self) -> None:
        import ray

        if self.pools:
            stop_pools(self.pools)
            self.pools = {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def split(items: list[Any], n: int) -> list[list[Any]]:
    """n contiguous, nearly equal chunks (the first ones one longer)."""
    k, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def rollout_metrics(scores: ScoredShard, prefix: str) -> dict[str, float]:
    m = {
        f"{prefix}/reward_mean": float(scores.scores.mean()),
        f"{prefix}/reward_std": float(scores.scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/response_len": float(scores.response_len.float().mean()),
    }
    for name, values in scores.breakdown.items():
        m[f"{prefix}/reward/{name}"] = float(values.mean())
    return m
