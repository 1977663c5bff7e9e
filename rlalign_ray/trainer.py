"""The driver: ``Trainer(config).fit()``.

Each step: sample prompts, generate (shards across the generator pool), score each shard
as it lands (reward pool) and take its reference log-probs, compute advantages (with the
critic's values for PPO), update the policy (and critic) groups, broadcast the new
weights. Synchronous: every generator holds the learner's latest version before it
samples again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlalign_ray.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_token_rewards,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    outcome_advantages,
    overlong_penalty,
)
from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem, ScoredShard, pad_responses
from rlalign_ray.data.prompts import PromptSampler, load_prompts
from rlalign_ray.errors import ActorFailure
from rlalign_ray.learner.base import rank_rows, split_for_ranks
from rlalign_ray.logger import MetricsLogger
from rlalign_ray.runtime.cluster import connect
from rlalign_ray.runtime.pools import get, lost_roles, start_pools, stop_pools
from rlalign_ray.sync.weight_sync import WeightSync
from rlalign_ray.topology import DEEPSPEED_ROLES, Topology, cpus_needed

log = logging.getLogger(__name__)


@dataclass
class Experience:
    """One step's samples as the driver holds them: refs to token shards, small scores."""

    shards: list[Any]  # ObjectRefs of RolloutBatch, in a fixed order
    rows: torch.Tensor | None  # rows of the joined shards that form the batch (None: all)
    scores: ScoredShard  # outcome of those rows
    ref_logprobs: list[Any] | None  # ObjectRefs of (B_i, T_i) reference log-probs per shard
    stats: dict[str, float]
    critic_parts: list[Any] | None = None  # ObjectRefs of the critic ranks' rows (ppo)


class Trainer:
    def __init__(self, cfg: Config, topology: Topology | None = None):
        self.cfg = cfg
        self.topology = topology or Topology.from_config(cfg)
        self.topology.validate(cfg)
        self.version = 0  # weight version the generators hold
        self.pools: dict[str, Any] = {}
        self.weights: WeightSync | None = None  # set up once the pools start
        self._started_ray = False
        a = cfg.algorithm
        self.kl_ctl = (
            AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
            if a.kl_target > 0
            else FixedKLController(a.kl_coef)
        )

    # ---- the algorithm ----------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        train = load_prompts(cfg.data.train, cfg.data.prompt_key)
        evals = (
            load_prompts(cfg.data.eval, cfg.data.prompt_key, cfg.data.eval_limit)
            if cfg.data.eval
            else []
        )
        sampler = PromptSampler(train, cfg.run.seed)
        logger = MetricsLogger(
            cfg.trainer.output_dir,
            cfg.trainer.steps,
            cfg.trainer.tensorboard,
            cfg.trainer.progress_bar,
        )
        last: dict[str, float] = {}
        try:
            self.start()
            if evals:
                last = self.evaluate(evals)
                logger.log(0, {**last, "weights/version": self.version})
            for step in range(1, cfg.trainer.steps + 1):
                t0 = time.perf_counter()
                # 1-3. sample prompts, generate, score (and reference log-probs)
                exp = self.make_experience(sampler)
                # 4. advantages (and the critic's returns)
                adv, returns, values, stats = self.advantages(exp, step)
                # 5. update the policy (and the critic)
                t = time.perf_counter()
                self.generators_sleep(True)
                metrics = self.learn(exp, adv, returns, values, step)
                self.generators_sleep(False)
                metrics["time/train_s"] = time.perf_counter() - t
                # 6. broadcast the new weights
                t = time.perf_counter()
                metrics["weights/bytes"] = self.broadcast(self.version + 1)
                metrics["time/sync_s"] = time.perf_counter() - t
                metrics.update(rollout_metrics(exp.scores, "train"))
                metrics.update(exp.stats)
                metrics.update(stats)
                metrics["weights/version"] = self.version
                metrics["train/kl_coef"] = self.kl_ctl.value
                self.kl_ctl.update(metrics.get("train/kl", 0.0), cfg.batch_size)
                if evals and (
                    step == cfg.trainer.steps
                    or cfg.trainer.eval_every
                    and step % cfg.trainer.eval_every == 0
                ):
                    metrics.update(self.evaluate(evals))
                if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                    self.save(Path(cfg.trainer.output_dir) / "checkpoints" / f"step_{step}")
                metrics["time/step_s"] = time.perf_counter() - t0
                logger.log(step, metrics)
                logger.advance()
                last = metrics
            self.save(Path(cfg.trainer.output_dir) / "final")
        except ActorFailure as e:
            e.args = (f"{e}\n{lost_roles(self.pools)}",)
            raise
        finally:
            logger.close()
            self.stop()
        return last

    # ---- 1-3. experience ----------------------------------------------------------------
    def make_experience(self, sampler: PromptSampler) -> Experience:
        """Generate and score a batch; with dynamic sampling, drop groups whose rewards are
        all equal and refill from more prompts (at most ``max_refills`` extra rounds)."""
        cfg = self.cfg
        want, n = cfg.rollout.prompts_per_step, cfg.rollout.n_samples
        shards, scored, refs, stats = [], [], [], {}
        rounds = 1 + (cfg.algorithm.max_refills if cfg.algorithm.dynamic_sampling else 0)
        for round_ in range(rounds):
            s, sc, rf, times = self.rollout(sampler.next(want))
            shards += s
            scored += sc
            refs += rf or []
            for k, v in times.items():
                stats[k] = stats.get(k, 0.0) + v
            scores = ScoredShard.concat(get(scored, "reward pool", cfg.run.call_timeout_s))
            informative = group_spread(scores.scores, n) > 0
            if not cfg.algorithm.dynamic_sampling or int(informative.sum()) >= want:
                break
        rows = None
        if cfg.algorithm.dynamic_sampling:
            stats["train/informative_groups"] = float(informative.float().mean())
            stats["train/refills"] = float(round_)
            # informative groups first, then (if refills ran out) uninformative ones
            order = torch.argsort((~informative).int(), stable=True)[:want]
            rows = (order.sort().values[:, None] * n + torch.arange(n)).flatten()
            scores = scores.select(rows)
        return Experience(shards, rows, scores, refs or None, stats)

    def rollout(self, prompts: list[PromptItem], greedy: bool = False):
        """Shard prompts across generators; score each shard (and get reference log-probs)
        as soon as it is ready, feeding the refs straight to the reward pool."""
        import ray

        gens = self.pools["generator"].actors
        rewards = self.pools["reward"].actors
        ref = self.pools.get("reference")
        n = 1 if greedy else self.cfg.rollout.n_samples
        t0 = time.perf_counter()
        shards = [
            g.generate.remote(chunk, n, greedy, self.version)
            for g, chunk in zip(gens, split(prompts, len(gens)))
            if chunk
        ]
        scored: dict[Any, Any] = {}
        ref_lp: dict[Any, Any] = {}
        pending = list(shards)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.cfg.run.call_timeout_s)
            if not done:
                raise ActorFailure(
                    f"generation did not finish within {self.cfg.run.call_timeout_s}s"
                )
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
        refs = [ref_lp[s] for s in shards] if ref_lp else None
        return shards, [scored[s] for s in shards], refs, times

    # ---- 4. advantages ------------------------------------------------------------------
    def advantages(self, exp: Experience, step: int):
        """(B, T) advantages; for PPO also the returns and the critic's values."""
        a, cfg = self.cfg.algorithm, self.cfg
        s = exp.scores
        mask, stats = s.response_mask, {}
        scores = s.scores
        if a.overlong_buffer:
            penalty = overlong_penalty(
                s.response_len, cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty
            )
            scores = scores + penalty
            stats["train/overlong_penalty"] = float(penalty.mean())
        kl = None
        if a.kl_in_reward and exp.ref_logprobs:
            ref = pad_responses(get(exp.ref_logprobs, "reference", cfg.run.call_timeout_s))
            ref = ref[exp.rows] if exp.rows is not None else ref
            kl = kl_penalty(s.logprobs, ref[:, : mask.shape[1]], a.kl_estimator) * mask
            stats["train/kl"] = float(masked_mean(kl, mask))
        groups = torch.arange(len(s)) // cfg.rollout.n_samples
        if not cfg.needs_critic:
            adv = outcome_advantages(
                a.name, scores, groups, mask, gamma=a.gamma, kl=kl, kl_coef=self.kl_ctl.value
            )
            return adv, None, None, stats
        values = self.critic_values(exp, step)
        token_rewards = compute_token_rewards(scores, mask, kl=kl, kl_coef=self.kl_ctl.value)
        adv, returns = gae(token_rewards, values, mask, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = masked_whiten(adv, mask) * mask
        stats["train/values_mean"] = float(masked_mean(values, mask))
        return adv, returns, values, stats

    def critic_values(self, exp: Experience, step: int) -> torch.Tensor:
        ranks = self.pools["critic"].actors
        rows = rank_rows(len(exp.scores), len(ranks), self.cfg.run.seed, step)
        exp.critic_parts = split_for_ranks(ranks[0], exp.shards, exp.rows, None, rows)
        parts = get(
            [c.values.remote(p) for c, p in zip(ranks, exp.critic_parts)],
            "critic",
            self.cfg.run.call_timeout_s,
        )
        values = torch.zeros_like(exp.scores.response_mask)
        for r, v in zip(rows, parts):
            values[r, : v.shape[1]] = v
        return values

    # ---- 5-6. update and broadcast ------------------------------------------------------
    def learn(
        self,
        exp: Experience,
        adv: torch.Tensor,
        returns: torch.Tensor | None,
        values: torch.Tensor | None,
        step: int,
    ) -> dict[str, float]:
        cfg = self.cfg
        ranks = self.pools["learner"].actors
        # each rank receives only its rows: tokens (and reference log-probs) cut by rank 0,
        # per-row tensors sliced here; outcome advantages travel as one value per row
        rows = rank_rows(len(exp.scores), len(ranks), cfg.run.seed, step)
        refs = None if cfg.algorithm.kl_in_reward else exp.ref_logprobs
        parts = split_for_ranks(ranks[0], exp.shards, exp.rows, refs, rows)
        if ADVANTAGE_ESTIMATORS[cfg.algorithm.name].per_sequence:
            first = exp.scores.response_mask.argmax(1, keepdim=True)  # a token of each row
            adv = adv.gather(1, first).squeeze(1)
        kl_coef = self.kl_ctl.value
        calls = [
            r.train_step.remote(p, adv[k], kl_coef, step) for r, p, k in zip(ranks, parts, rows)
        ]
        critics = self.pools["critic"].actors if "critic" in self.pools else []
        if critics:
            c_rows = rank_rows(len(exp.scores), len(critics), cfg.run.seed, step)
            calls += [
                c.train_step.remote(p, returns[k], values[k], step)
                for c, p, k in zip(critics, exp.critic_parts, c_rows)
            ]
        out = get(calls, "learner group", self.cfg.run.call_timeout_s)
        metrics = {f"train/{k}": v for k, v in out[0].items()}
        if critics:
            metrics.update({f"critic/{k}": v for k, v in out[len(ranks)].items()})
        return metrics

    def broadcast(self, version: int) -> int:
        """Every generator loads the learner's new weights and reports the version."""
        nbytes = self.weights.sync(version)
        self.version = version
        return nbytes

    def evaluate(self, evals: list[PromptItem]) -> dict[str, float]:
        _, scored, _, times = self.rollout(evals, greedy=True)
        scores = ScoredShard.concat(get(scored, "reward pool (eval)", self.cfg.run.call_timeout_s))
        return {**rollout_metrics(scores, "eval"), "time/eval_s": times["time/generate_s"]}

    def save(self, path: Path) -> None:
        get(
            [r.save_pretrained.remote(str(path)) for r in self.pools["learner"].actors],
            f"saving {path}",
            self.cfg.run.call_timeout_s,
        )

    def generators_sleep(self, asleep: bool) -> None:
        """With ``rollout.enable_sleep_mode``, the vLLM engines give their GPU memory to the
        learner while it trains (colocated on the same GPUs) and take it back after."""
        if not self.cfg.rollout.enable_sleep_mode:
            return
        gens = self.pools["generator"].actors
        calls = [g.sleep.remote() if asleep else g.wake_up.remote() for g in gens]
        get(
            calls, "generator sleep" if asleep else "generator wake-up", self.cfg.run.call_timeout_s
        )

    # ---- actors -------------------------------------------------------------------------
    def start(self) -> None:
        roles = self.topology.role_specs(self.cfg)
        self._started_ray = connect(self.cfg.run, cpus_needed(roles))
        self.pools = start_pools(roles, self.cfg.run.placement_timeout_s)
        timeout = self.cfg.run.call_timeout_s
        for name, pool in self.pools.items():
            if name in DEEPSPEED_ROLES:  # a process group: rendezvous at rank 0
                addr, port = get(pool.actors[0].address.remote(), f"{name} rank 0", timeout)
                get([r.setup.remote(addr, port) for r in pool.actors], f"{name} setup", timeout)
            else:
                get([a.ping.remote() for a in pool.actors], f"{name} start-up", timeout)
        gpus = [self.topology.pools[r].resources.num_gpus for r in ("learner", "generator")]
        self.weights = WeightSync(
            self.cfg.sync,
            self.cfg.generator_dtype,
            self.pools["learner"].actors,
            self.pools["generator"].actors,
            on_gpu=min(gpus) > 0,
        )
        self.weights.setup()

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


def group_spread(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) max - min reward within each group of n adjacent samples."""
    g = scores.view(-1, n)
    return g.max(dim=1).values - g.min(dim=1).values


def rollout_metrics(scores: ScoredShard, prefix: str) -> dict[str, float]:
    m = {
        f"{prefix}/reward_mean": float(scores.scores.mean()),
        f"{prefix}/reward_std": float(scores.scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/response_len": float(scores.response_len.float().mean()),
    }
    for name, values in scores.breakdown.items():
        m[f"{prefix}/reward/{name}"] = float(values.mean())
    return {k: v for k, v in m.items() if math.isfinite(v)}
