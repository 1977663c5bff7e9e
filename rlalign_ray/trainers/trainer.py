"""The driver: ``Trainer(config).fit()``, a loop over the pool API (``rlalign_ray.pools``).

Each step: request generation (chunks that idle generators pull; each chunk is scored and
referenced as soon as it lands), collect the step's experience, compute advantages (with
the critic's values for PPO), update the policy (and critic) groups while generation goes
on, and publish the new weights, which generators load between chunks.

``trainer.max_staleness: k`` bounds how far generation runs ahead: step s's samples may be
requested once version s - 1 - k is published, so none is more than k versions older than
the policy that trains on it. k = 0 is synchronous training: every sample comes from the
learner's latest weights, and generators and learner take turns. With k > 0 the loss
corrects for stale samples with AReaL's decoupled PPO objective: clipping is against the
learner's own log-probs before the update (the proximal policy), and each token's
advantage is weighted by min(pi_proximal / pi_behaviour, ``algorithm.behaviour_is_cap``)
-- the generator's recorded log-probs are the behaviour policy. It keeps the trust region
around the current policy (a ratio against a policy k versions old would be clipped
mostly on staleness, not on the update), and the cap bounds the variance.

Every ``trainer.save_every`` steps the driver writes a resumable checkpoint (learner and
critic ranks' DeepSpeed state, sampler, KL controller, random states: ``checkpoint.py``);
``trainer.resume`` continues a run from one.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlalign_ray import checkpoint
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
from rlalign_ray.algorithms.eval_metrics import sample_metrics
from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem, ScoredShard, pad_responses
from rlalign_ray.data.prompts import PromptSampler, load_prompts
from rlalign_ray.errors import ActorFailure, DataError
from rlalign_ray.ledger import SampleLog
from rlalign_ray.pools import ActorPool, EnvPool, Experience, WeightSync, start, stop
from rlalign_ray.preflight import preflight, prepare_data
from rlalign_ray.run_log import MetricsLogger
from rlalign_ray.runtime.cluster import connect
from rlalign_ray.runtime.placement import get, lost_roles
from rlalign_ray.topology import Topology
from rlalign_ray.trainers.rollouts import Rollouts
from rlalign_ray.trainers.samples import completion_rows

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, topology: Topology | None = None):
        self.cfg = cfg
        self.topology = topology or Topology.from_config(cfg)
        self.topology.validate(cfg)
        self.version = 0  # the weight version the learner has published
        self.pools: dict[str, ActorPool] = {}
        self.weights: WeightSync | None = None  # set up once the pools start
        self.rollouts: Rollouts | None = None
        self._started_ray = False
        self.learner_restarts = 0
        a = cfg.algorithm
        self.kl_ctl = (
            AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
            if a.kl_target > 0
            else FixedKLController(a.kl_coef)
        )

    # ---- the algorithm ----------------------------------------------------------------
    def load_data(self) -> tuple[list[PromptItem], dict[str, list[PromptItem]], dict]:
        """The training and evaluation prompts, checked (``preflight``) and measured
        (``data.truncation``), with their ``data/...`` statistics."""
        cfg = self.cfg
        train = _prompts("data.train", cfg.data.train, cfg.data.prompt_key)
        evals = eval_sets(cfg)
        preflight(cfg, self.topology, train)
        train, data_stats = prepare_data(cfg, self.topology, train, "data.train")
        for name in list(evals):
            key = f"data.eval.{name}" if name else "data.eval"
            evals[name], eval_stats = prepare_data(cfg, self.topology, evals[name], key)
            infix = f"/eval_{name}_" if name else "/eval_"
            data_stats.update({k.replace("/", infix): v for k, v in eval_stats.items()})
        return train, evals, data_stats

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        train, evals, data_stats = self.load_data()
        fresh = not Path(cfg.trainer.output_dir).exists()  # removed if no step trains
        trained = False
        ckpt = checkpoint.prepare_run(cfg.trainer.output_dir, cfg.trainer.resume)
        state = checkpoint.TrainerState.read(ckpt) if ckpt else None
        # a fresh start drops an old run's rows
        logger = MetricsLogger.from_config(cfg, keep_upto=state.step if state else -1)
        ledger = (
            SampleLog(cfg.trainer.output_dir, state.step if state else -1)
            if cfg.trainer.sample_log
            else None
        )
        last: dict[str, float] = {}
        threads = torch.get_num_threads()
        if cfg.run.driver_threads:  # restored below: a Python API caller keeps its own
            torch.set_num_threads(cfg.run.driver_threads)
        try:
            self.start()
            self.rollouts = Rollouts(
                cfg,
                self.pools["generator"],
                self.pools["reward"],
                self.pools.get("reference"),
                PromptSampler(train, cfg.run.seed),
            )
            if state is not None:
                self.restore(ckpt, state)
                logger.advance(state.step)
            elif evals:
                last = self.evaluate(evals)
                logger.log(0, {**last, "weights/version": self.version})
            self.data_stats = data_stats
            step = (state.step if state else 0) + 1
            while step <= cfg.trainer.steps:
                try:
                    last = self.train_step(step, evals, logger, ledger)
                    trained = True
                except ActorFailure as e:  # a learner rank that died: from the checkpoint
                    step = self.restart_learners(e, logger, ledger) + 1
                    continue
                step += 1
            self.weights.wait()
            self.save(Path(cfg.trainer.output_dir) / "final", merged=cfg.trainer.save_merged)
        except ActorFailure as e:
            e.args = (f"{e}\n{lost_roles(self.pools)}",)
            raise
        finally:
            torch.set_num_threads(threads)
            logger.close()
            ledger and ledger.close()
            self.stop()
            if fresh and not trained and cfg.trainer.steps > 0:  # a run that never started
                shutil.rmtree(cfg.trainer.output_dir, ignore_errors=True)
        return last

    def train_step(
        self,
        step: int,
        evals: dict[str, list[PromptItem]],
        logger: MetricsLogger,
        ledger: SampleLog | None,
    ) -> dict[str, float]:
        """One training step (1-6 above), logged; returns its metrics."""
        cfg, rollouts, k = self.cfg, self.rollouts, self.cfg.trainer.max_staleness
        t0, cpu0 = time.perf_counter(), time.process_time()
        idle0 = self.pools["generator"].idle_seconds()
        # 1-3. generation for every step the staleness bound allows (k = 0: this one)
        rollouts.request_upto(min(cfg.trainer.steps, self.version + 1 + k))
        exp = rollouts.collect(step, self.version)
        if cfg.trainer.log_completions:
            rows = completion_rows(exp, cfg.trainer.log_completions, cfg.run.call_timeout_s)
            logger.log_completions(step, rows)
        # 4. advantages (and the critic's returns)
        adv, returns, values, stats = self.advantages(exp, step)
        exp = replace(exp, advantages=adv, returns=returns, values=values)
        # 5. update the policy (and the critic); generation goes on meanwhile
        t = time.perf_counter()
        metrics = self.learn(exp, step)
        metrics["time/train_s"] = time.perf_counter() - t
        # 6. publish the new weights (k = 0: every generator loads them now)
        t = time.perf_counter()
        metrics["weights/bytes"] = self.broadcast(self.version + 1)
        metrics["time/sync_s"] = time.perf_counter() - t
        metrics.update(rollout_metrics(exp.scores, "train"))
        metrics.update(exp.stats)
        metrics.update(stats)
        metrics["weights/version"] = self.version
        metrics.update(self.data_stats)
        metrics["train/kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(metrics.get("train/kl", 0.0), cfg.batch_size)
        if evals and (
            step == cfg.trainer.steps
            or cfg.trainer.eval_every
            and step % cfg.trainer.eval_every == 0
        ):
            metrics.update(self.evaluate(evals))
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            self.checkpoint(step)
        gens = len(self.pools["generator"])
        idle = self.pools["generator"].idle_seconds() - idle0
        metrics["time/generator_idle_s"] = idle / gens
        metrics["time/step_s"] = time.perf_counter() - t0
        # the driver's own work: CPU of this process (Python and Ray's threads in it)
        metrics["time/driver_cpu_s"] = time.process_time() - cpu0
        metrics["run/actor_restarts"] = sum(p.restarts for p in self.pools.values())
        logger.log(step, metrics)
        if ledger is not None:
            ledger.write(step, rollouts.samples.pop(step, []))
        logger.advance()
        return metrics

    # ---- a learner rank that died ----------------------------------------------------------
    def restart_learners(
        self, error: ActorFailure, logger: MetricsLogger, ledger: SampleLog | None
    ) -> int:
        """After ``error``: if a learner (or critic) rank died, start the groups again from
        the last checkpoint (``run.max_learner_restarts`` times a run) and return its step;
        otherwise, or past the limit, stop with an error naming the checkpoint to resume
        from. Generation in flight is dropped: it was sampled with later weights."""
        groups = [r for r in ("learner", "critic") if r in self.pools]
        dead = [f"{r} rank {i}" for r in groups for i in self.pools[r].dead_actors(10.0)]
        if not dead:
            raise error
        ckpt = checkpoint.latest(checkpoint.checkpoints_dir(self.cfg.trainer.output_dir))
        limit = self.cfg.run.max_learner_restarts
        if self.learner_restarts >= limit or ckpt is None:
            raise ActorFailure(
                f"{error}\n{', '.join(dead)} died"
                + (
                    f" after {self.learner_restarts} restarts (run.max_learner_restarts={limit})"
                    if limit
                    else ""
                )
                + f". {resume_hint(ckpt)}"
            ) from None
        self.learner_restarts += 1
        state = checkpoint.TrainerState.read(ckpt)
        log.warning(
            "%s died; restarting the %s from %s (%d of run.max_learner_restarts=%d)",
            ", ".join(dead),
            " and ".join(groups),
            ckpt,
            self.learner_restarts,
            limit,
        )
        for r in groups:
            self.pools[r].restart_all()
        self.pools["generator"].abandon()  # not trained: the rollouts ignore what lands
        self.weights.abandon()  # broken by the dead rank; the restore syncs again
        self.weights.setup()
        self.restore(ckpt, state)
        logger.rewind(state.step)
        if ledger is not None:
            ledger.rewind(state.step)
        return state.step

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
        values = self.rollouts.wait(self.pools["critic"].values(exp, step))
        token_rewards = compute_token_rewards(scores, mask, kl=kl, kl_coef=self.kl_ctl.value)
        adv, returns = gae(token_rewards, values, mask, a.gamma, a.lam)
        if a.whiten_advantages:
            adv = masked_whiten(adv, mask) * mask
        stats["train/values_mean"] = float(masked_mean(values, mask))
        return adv, returns, values, stats

    # ---- 5-6. update and broadcast ------------------------------------------------------
    def learn(
        self,
        exp: Experience,
        step: int,
    ) -> dict[str, float]:
        """Policy (and critic) updates, run together; chunks keep landing meanwhile."""
        self.generators_sleep(True)
        per_sequence = ADVANTAGE_ESTIMATORS[self.cfg.algorithm.name].per_sequence
        policy = self.pools["learner"].update(exp, self.kl_ctl.value, step, per_sequence)
        critic = self.pools["critic"].update(exp, step) if "critic" in self.pools else None
        metrics = self.rollouts.wait(policy)
        if critic is not None:
            metrics.update(self.rollouts.wait(critic))
        self.generators_sleep(False)
        return metrics

    def broadcast(self, version: int) -> int:
        """Publish ``version``; generators load it after the chunk they are sampling
        (``rollout.inflight_updates``: between two decode steps of it). In synchronous
        training (k = 0) wait until every generator holds it."""
        sync = self.weights.start(version)
        self.version = version
        if self.cfg.trainer.max_staleness == 0:
            return sync.result()
        return self.weights.plan.num_bytes

    def evaluate(self, evals: list[PromptItem] | dict[str, list[PromptItem]]) -> dict[str, float]:
        """``trainer.eval_n_samples`` samples (at ``rollout.eval_temperature``; 0: greedy) of
        the held-out prompts with the latest weights. ``evals``: one set (metrics ``eval/``) or
        named sets (``eval_sets``; the name "" is ``eval/``, others ``eval/<name>/``)."""
        sync = self.weights.in_flight()
        if sync is not None:
            self.rollouts.wait(sync)
        t = self.cfg.trainer
        sets = evals if isinstance(evals, dict) else {"": evals}
        scores, seconds = self.rollouts.evaluate_sets(sets, t.eval_n_samples)
        out: dict[str, float] = {}
        for name, s in scores.items():
            prefix = f"eval/{name}" if name else "eval"
            out.update(rollout_metrics(s, prefix))
            m = sample_metrics(s.scores, s.group_ids, t.eval_n_samples, t.eval_pass_threshold)
            out.update({f"{prefix}/{k}": v for k, v in m.items()})
        return {**out, "time/eval_s": seconds}

    def save(self, path: Path, merged: bool = False) -> None:
        self.pools["learner"].save(str(path), merged)

    # ---- resumable checkpoints (rlalign_ray/checkpoint.py) ------------------------------
    def checkpoint(self, step: int) -> Path:
        """Everything a run needs to continue after ``step``, in
        ``checkpoints/step_<step>`` (written aside, then renamed)."""
        t = self.cfg.trainer
        tmp = checkpoint.staging(t.output_dir, step)
        self.save(tmp)  # the policy as a Hugging Face folder
        for role in ("learner", "critic"):
            if role in self.pools:
                self.pools[role].save_checkpoint(str(tmp / role))
        torch.save(self.pools["generator"].rng_states(), tmp / "generators_rng.pt")
        torch.save(checkpoint.rng_state(), tmp / "driver_rng.pt")
        checkpoint.TrainerState(
            step=step,
            version=self.version,
            sampler=self.rollouts.resume_state(step),
            kl_coef=self.kl_ctl.value,
            totals=dict(self.rollouts.totals),
        ).write(tmp)
        return checkpoint.commit(tmp, step, t.keep_checkpoints)

    def restore(self, path: Path, state: checkpoint.TrainerState) -> None:
        """Load the checkpoint in ``path`` into the started pools and the driver, and publish
        the restored weights to every generator (as version ``state.version``)."""
        for role in ("learner", "critic"):
            if role in self.pools:
                self.pools[role].load_checkpoint(str(path / role))
        self.weights.sync(state.version)
        self.version = state.version
        gens = checkpoint.load(path / "generators_rng.pt")
        self.pools["generator"].set_rng_states(gens)
        self.rollouts.resume_from(state.step, state.sampler, state.totals)
        self.kl_ctl.value = state.kl_coef
        checkpoint.set_rng_state(checkpoint.load(path / "driver_rng.pt"))

    def generators_sleep(self, asleep: bool) -> None:
        """With ``rollout.enable_sleep_mode`` (synchronous only), the vLLM engines give
        their GPU memory to the learner while it trains and take it back after."""
        if self.cfg.rollout.enable_sleep_mode:
            self.pools["generator"].sleep(asleep)

    # ---- actors -------------------------------------------------------------------------
    def start(self) -> None:
        self.pools = self.topology.build_pools(self.cfg)
        if self.cfg.env.path and self.cfg.env.num_actors:
            self.pools["env"] = EnvPool(self.cfg)
        cpus = sum(p.spec.num_actors * p.spec.resources.num_cpus for p in self.pools.values())
        self._started_ray = connect(self.cfg.run, cpus)
        start(list(self.pools.values()), self.cfg.run.placement_timeout_s)
        if "env" in self.pools:
            self.pools["env"].attach(self.pools["generator"])
        self.weights = WeightSync(
            self.cfg.sync,
            self.cfg.generator_dtype,
            self.pools["learner"],
            self.pools["generator"],
            overlap=self.cfg.trainer.max_staleness > 0,
            inflight=self.cfg.rollout.inflight_updates,
        )
        self.weights.setup()

    def stop(self) -> None:
        import ray

        if self.pools:
            stop(list(self.pools.values()))
            self.pools = {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def eval_sets(cfg: Config) -> dict[str, list[PromptItem]]:
    """``data.eval`` loaded: a single file as the set "" (metrics ``eval/...``), a mapping
    name -> file as named sets (``eval/<name>/...``); {} without evaluation."""
    d = cfg.data
    if not d.eval:
        return {}
    if isinstance(d.eval, str):
        return {"": _prompts("data.eval", d.eval, d.prompt_key, d.eval_limit)}
    return {
        name: _prompts(f"data.eval.{name}", path, d.prompt_key, d.eval_limit)
        for name, path in d.eval.items()
    }


def resume_hint(ckpt: Path | None) -> str:
    """How to continue a run that stopped, for its error message."""
    if ckpt is None:
        return (
            "No checkpoint was written yet (trainer.save_every), so the run starts again "
            "from the beginning."
        )
    step = checkpoint.TrainerState.read(ckpt).step
    return (
        f"The last checkpoint, {ckpt} (step {step}), is intact: continue the run from it "
        "with trainer.resume=auto (the same trainer.output_dir), or set "
        "run.max_learner_restarts to restart the learner group inside the run."
    )


def _prompts(key: str, path: str, prompt_key: str, limit: int = 0) -> list[PromptItem]:
    """``load_prompts``, its errors prefixed with the config key that named the file."""
    try:
        return load_prompts(path, prompt_key, limit)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def rollout_metrics(scores: ScoredShard, prefix: str) -> dict[str, float]:
    m = {
        f"{prefix}/reward_mean": float(scores.scores.mean()),
        f"{prefix}/reward_std": float(scores.scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/response_len": float(scores.response_len.float().mean()),
    }
    for name, values in scores.breakdown.items():
        m[f"{prefix}/reward/{name}"] = float(values.nanmean())  # NaN: reward not applicable
    return {k: v for k, v in m.items() if math.isfinite(v)}
