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

``trainer.max_staleness: auto`` steers k by the off-policy price each step pays (the
importance-weight clip fraction and the behaviour-learner mismatch KL:
``algorithms/staleness.py``), between 0 and ``trainer.max_staleness_cap``.

Every ``trainer.save_every`` steps the driver writes a resumable checkpoint (learner and
critic ranks' DeepSpeed state, sampler, KL controller, random states: ``checkpoint.py``;
pipelined, also the rollout buffer: the chunks sampled for later steps, ``buffer.py``);
``trainer.resume`` continues a run from one, logging what the run that never stopped logs.
``trainer.output_dir`` is a local folder or a URI (``storage.py``: each process writes its
own files from its node).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch

from rlalign_ray import checkpoint
from rlalign_ray.algorithms import AdaptiveKLController, FixedKLController, masked_mean, objective
from rlalign_ray.algorithms.eval_metrics import sample_metrics
from rlalign_ray.config import Config
from rlalign_ray.data.batch import PromptItem, ScoredShard, pad_responses
from rlalign_ray.data.prompts import PromptSampler
from rlalign_ray.errors import ActorFailure
from rlalign_ray.ledger import SampleLog
from rlalign_ray.pools import ActorPool, Experience, GeneratorPools, WeightSync, start, stop
from rlalign_ray.preflight import preflight, prepare_data
from rlalign_ray.roles import DEEPSPEED_ROLES
from rlalign_ray.rollout.backends import sleeps
from rlalign_ray.run_log import MetricsLogger
from rlalign_ray.runtime.cluster import connect
from rlalign_ray.runtime.placement import get, lost_roles
from rlalign_ray.storage import RunLogs, Storage, is_remote, join, local_path
from rlalign_ray.topology import Topology
from rlalign_ray.trainers.buffer import FOLDER as BUFFER
from rlalign_ray.trainers.buffer import RolloutBuffer
from rlalign_ray.trainers.outputs import check_output_dir, finish_logs
from rlalign_ray.trainers.prompt_sets import eval_sets, prompt_set
from rlalign_ray.trainers.rollouts import Rollouts
from rlalign_ray.trainers.samples import completion_rows

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, topology: Topology | None = None):
        self.cfg = cfg
        self.topology = topology or Topology.from_config(cfg)
        self.topology.validate(cfg)
        self.version = 0  # the weight version the learner has published
        self.pools: dict[str, ActorPool] = {}  # by name: the roles' and named pools
        self.generators: GeneratorPools | None = None  # every generator pool, as one
        self.weights: WeightSync | None = None  # set up once the pools start
        self.rollouts: Rollouts | None = None
        self._started_ray = False
        self.learner_restarts = 0
        self.storage = Storage.from_config(cfg.trainer)
        out = cfg.trainer.output_dir
        self.output_dir = out if is_remote(out) else local_path(out)  # a URI or an absolute path
        self.objective = cfg.objective  # registries resolved once (algorithms/objective.py)
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
        train = prompt_set("data.train", cfg.data.train, cfg.data.prompt_key)
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
        cfg, out, storage = self.cfg, self.output_dir, self.storage
        train, evals, data_stats = self.load_data()
        fresh = not storage.exists(out)  # removed if no step trains
        trained = False
        ckpt = checkpoint.prepare_run(out, cfg.trainer.resume, storage)
        state = checkpoint.TrainerState.read(ckpt, storage) if ckpt else None
        self.logs = RunLogs(storage, out)  # for a URI: a staging folder, uploaded
        self.logs.pull()
        # a fresh start drops an old run's rows
        keep = state.step if state else -1
        logger = MetricsLogger.from_config(cfg, keep_upto=keep, folder=self.logs.folder)
        ledger = SampleLog(self.logs.folder, keep) if cfg.trainer.sample_log else None
        last: dict[str, float] = {}
        threads = torch.get_num_threads()
        if cfg.run.driver_threads:  # restored below: a Python API caller keeps its own
            torch.set_num_threads(cfg.run.driver_threads)
        try:
            self.start()
            self.rollouts = Rollouts(
                cfg,
                self.generators,
                self.of_kind("reward"),  # the default pool first, then named ones
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
            final = join(out, "final")
            if is_remote(final):
                storage.remove(final)  # an earlier final/ of this run: no stale files
            self.save(final, merged=cfg.trainer.save_merged)
        except ActorFailure as e:
            e.args = (f"{e}\n{lost_roles(self.pools)}",)
            raise
        finally:
            torch.set_num_threads(threads)
            logger.close()
            ledger and ledger.close()
            self.stop()
            # a new run that never started leaves nothing behind
            finish_logs(self.logs, fresh and not trained and cfg.trainer.steps > 0)
        return last

    def train_step(
        self,
        step: int,
        evals: dict[str, list[PromptItem]],
        logger: MetricsLogger,
        ledger: SampleLog | None,
    ) -> dict[str, float]:
        """One training step (1-6 above), logged; returns its metrics."""
        cfg, rollouts, k = self.cfg, self.rollouts, self.rollouts.k  # auto: it moves
        t0, cpu0 = time.perf_counter(), time.process_time()
        idle0 = self.generators.idle_seconds()
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
        metrics["rollout/max_staleness"] = k  # the bound this step's requests and drops used
        price = (metrics.get(f"train/{m}", 0.0) for m in ("mismatch_kl", "behaviour_is_clipfrac"))
        rollouts.staleness.update(*price)
        if evals and (
            step == cfg.trainer.steps
            or cfg.trainer.eval_every
            and step % cfg.trainer.eval_every == 0
        ):
            metrics.update(self.evaluate(evals))
        gens = len(self.generators)
        idle = self.generators.idle_seconds() - idle0
        metrics["time/generator_idle_s"] = idle / gens
        metrics["time/step_s"] = time.perf_counter() - t0
        # the driver's own work: CPU of this process (Python and Ray's threads in it)
        metrics["time/driver_cpu_s"] = time.process_time() - cpu0
        metrics["run/actor_restarts"] = sum(p.restarts for p in self.pools.values())
        self.record(step, metrics, logger, ledger)
        return metrics

    def record(
        self, step: int, metrics: dict, logger: MetricsLogger, ledger: SampleLog | None
    ) -> None:
        """The step's metrics and ledger lines, then (every ``trainer.save_every`` steps) its
        checkpoint: the lines reach a URI output_dir first, so a run killed once its
        checkpoint is committed lost none."""
        logger.log(step, metrics)
        if ledger is not None:
            ledger.write(step, self.rollouts.samples.pop(step, []))
        saved = self.cfg.trainer.save_every and step % self.cfg.trainer.save_every == 0
        self.logs.push(0.0 if saved else self.cfg.trainer.log_sync_s)
        if saved:
            self.checkpoint(step)
        logger.advance()

    # ---- a learner rank that died ----------------------------------------------------------
    def restart_learners(
        self, error: ActorFailure, logger: MetricsLogger, ledger: SampleLog | None
    ) -> int:
        """After ``error``: if a learner (or critic) rank died, start the groups again from
        the last checkpoint (``run.max_learner_restarts`` times a run) and return its step;
        otherwise, or past the limit, stop with an error naming the checkpoint to resume
        from. Generation in flight is dropped; the steps the checkpoint buffered (pipelined)
        train on its chunks, as they did before."""
        groups = [r for r in DEEPSPEED_ROLES if r in self.pools]
        dead = [f"{r} rank {i}" for r in groups for i in self.pools[r].dead_actors(10.0)]
        if not dead:
            raise error
        ckpt = checkpoint.latest(checkpoint.checkpoints_dir(self.output_dir), self.storage)
        limit = self.cfg.run.max_learner_restarts
        if self.learner_restarts >= limit or ckpt is None:
            raise ActorFailure(
                f"{error}\n{', '.join(dead)} died"
                + (
                    f" after {self.learner_restarts} restarts (run.max_learner_restarts={limit})"
                    if limit
                    else ""
                )
                + f". {resume_hint(ckpt, self.storage)}"
            ) from None
        self.learner_restarts += 1
        state = checkpoint.TrainerState.read(ckpt, self.storage)
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
        self.generators.abandon()  # not trained: the rollouts ignore what lands
        self.weights.abandon()  # broken by the dead rank; the restore syncs again
        self.weights.setup()
        self.restore(ckpt, state)
        logger.rewind(state.step)
        if ledger is not None:
            ledger.rewind(state.step)
        return state.step

    # ---- 4. advantages ------------------------------------------------------------------
    def advantages(self, exp: Experience, step: int):
        """(B, T) advantages; for PPO also the returns and the critic's values
        (``algorithms/objective.py`` holds the math)."""
        o, s = self.objective, exp.scores
        mask = s.response_mask
        scores, shaped = objective.shaped_scores(o, s.scores, s.response_len)
        stats = {f"train/{k}": v for k, v in shaped.items()}
        values = self.pools["critic"].values(exp, step) if self.cfg.needs_critic else None
        kl = None
        if o.kl_in_reward and exp.ref_logprobs:
            kl = self.reward_kl(exp, step)
            stats["train/kl"] = float(masked_mean(kl, mask))
        if values is not None:
            values = self.rollouts.wait(values)
            stats["train/values_mean"] = float(masked_mean(values, mask))
        groups = torch.arange(len(s)) // self.cfg.rollout.n_samples
        adv, returns = objective.advantages(o, scores, groups, mask, kl, self.kl_ctl.value, values)
        return adv, returns, values, stats

    def reward_kl(self, exp: Experience, step: int) -> torch.Tensor:
        """(B, T) per-token KL to the reference for the reward, from the learner's old
        log-probs (which its ranks keep for the update), or the generator's with
        ``algorithm.use_behaviour_logprobs``."""
        cfg, mask = self.cfg, exp.scores.response_mask
        if cfg.algorithm.use_behaviour_logprobs:
            old = exp.scores.logprobs
        else:
            old = self.rollouts.wait(self.pools["learner"].old_logprobs(exp, step))
        ref = pad_responses(get(exp.ref_logprobs, "reference", cfg.run.call_timeout_s))
        ref = ref[exp.rows] if exp.rows is not None else ref
        return objective.reward_kl(old, ref[:, : mask.shape[1]], mask, self.objective.kl_estimator)

    # ---- 5-6. update and broadcast ------------------------------------------------------
    def learn(
        self,
        exp: Experience,
        step: int,
    ) -> dict[str, float]:
        """Policy (and critic) updates, run together; chunks keep landing meanwhile."""
        self.generators_sleep(True)
        try:
            per_sequence = self.objective.estimator.per_sequence
            policy = self.pools["learner"].update(exp, self.kl_ctl.value, step, per_sequence)
            critic = self.pools["critic"].update(exp, step) if "critic" in self.pools else None
            metrics = self.rollouts.wait(policy)
            if critic is not None:
                metrics.update(self.rollouts.wait(critic))
        finally:  # also when a rank died: a restart's restore syncs weights into them
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

    def save(self, path: str, merged: bool = False) -> None:
        """The policy as a Hugging Face folder (or URI), written by learner rank 0."""
        self.pools["learner"].save(str(path), merged)

    # ---- resumable checkpoints (rlalign_ray/checkpoint.py) ------------------------------
    def checkpoint(self, step: int) -> str:
        """Everything a run needs to continue after ``step``, in ``checkpoints/step_<step>``
        (locally written aside, then renamed; in a URI trainer_state.json goes last).
        Pipelined, the chunks requested for later steps land first and are stored (the
        rollout buffer)."""
        t, storage = self.cfg.trainer, self.storage
        buffer = self.rollouts.buffer()  # waits for generation in flight
        folder = checkpoint.begin(self.output_dir, step, storage)
        with storage.writing(join(folder, BUFFER), "driver") as local:
            buffer.write(local)
        self.save(folder)  # the policy as a Hugging Face folder
        for role in DEEPSPEED_ROLES:
            if role in self.pools:  # every rank writes (uploads) its own files
                self.pools[role].save_checkpoint(join(folder, role))
        with storage.writing(folder, "driver") as local:
            torch.save(self.generators.rng_states(), local / "generators_rng.pt")
            torch.save(checkpoint.rng_state(), local / "driver_rng.pt")
        checkpoint.TrainerState(
            step=step,
            version=self.version,
            sampler=self.rollouts.resume_state(step),
            kl_coef=self.kl_ctl.value,
            totals=dict(self.rollouts.totals),
            staleness=self.rollouts.staleness.state_dict(),
        ).write(folder, storage)
        return checkpoint.commit(folder, step, t.keep_checkpoints, storage)

    def restore(self, path: str, state: checkpoint.TrainerState) -> None:
        """Load the checkpoint in ``path`` into the started pools and the driver, and publish
        the restored weights to every generator (as version ``state.version``)."""
        for role in DEEPSPEED_ROLES:
            if role in self.pools:
                self.pools[role].load_checkpoint(join(path, role))
        self.weights.sync(state.version)
        self.version = state.version

        def driver_files(name: str) -> bool:
            return name in ("generators_rng.pt", "driver_rng.pt") or name.startswith(BUFFER)

        with self.storage.reading(path, "driver", driver_files) as local:
            gens = checkpoint.load(local / "generators_rng.pt")
            driver_rng = checkpoint.load(local / "driver_rng.pt")
            buffer = RolloutBuffer.read(local / BUFFER)
        self.generators.set_rng_states(gens)
        self.rollouts.resume_from(state.step, state.sampler, state.totals, buffer)
        if state.staleness:
            self.rollouts.staleness.load_state_dict(state.staleness)
        self.kl_ctl.value = state.kl_coef
        checkpoint.set_rng_state(driver_rng)

    def generators_sleep(self, asleep: bool) -> None:
        """With a backend that sleeps (``rollout.vllm.enable_sleep_mode``; synchronous
        only), the engines give their GPU memory to the learner while it trains and take it
        back after (the weights' memory: the next weight version fills it, and then the KV
        cache comes back)."""
        if sleeps(self.cfg.rollout):
            self.generators.sleep(asleep)

    # ---- actors -------------------------------------------------------------------------
    def of_kind(self, role: str) -> list[ActorPool]:
        """The started pools of ``role``: its default pool first, then named ones."""
        mine = [p for p in self.pools.values() if p.role == role]
        return sorted(mine, key=lambda p: p.name != role)

    def start(self) -> None:
        self.pools = self.topology.build_pools(self.cfg)
        self.generators = GeneratorPools(self.of_kind("generator"))
        cpus = sum(p.spec.num_actors * p.spec.resources.num_cpus for p in self.pools.values())
        self._started_ray = connect(self.cfg.run, cpus)
        timeout = self.cfg.run.call_timeout_s
        start(
            list(self.pools.values()),
            self.cfg.run.placement_timeout_s,
            # before any model loads: do the nodes that write checkpoints reach output_dir?
            placed=lambda: check_output_dir(self.storage, self.output_dir, self.pools, timeout),
        )
        for env in self.of_kind("env"):
            for gen in self.generators.members:
                env.attach(gen)
        self.weights = WeightSync(
            self.cfg.sync,
            self.cfg.generator_dtype,
            self.pools["learner"],
            self.generators,
            overlap=self.cfg.pipelined,
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


def resume_hint(ckpt: str | None, storage: Storage | None = None) -> str:
    """How to continue a run that stopped, for its error message."""
    if ckpt is None:
        return (
            "No checkpoint was written yet (trainer.save_every), so the run starts again "
            "from the beginning."
        )
    step = checkpoint.TrainerState.read(ckpt, storage).step
    return (
        f"The last checkpoint, {ckpt} (step {step}), is intact: continue the run from it "
        "with trainer.resume=auto (the same trainer.output_dir), or set "
        "run.max_learner_restarts to restart the learner group inside the run."
    )


def rollout_metrics(scores: ScoredShard, prefix: str) -> dict[str, float]:
    m = {
        f"{prefix}/reward_mean": float(scores.scores.mean()),
        f"{prefix}/reward_std": float(scores.scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/response_len": float(scores.response_len.float().mean()),
    }
    for name, values in scores.breakdown.items():
        m[f"{prefix}/reward/{name}"] = float(values.nanmean())  # NaN: reward not applicable
    return {k: v for k, v in m.items() if math.isfinite(v)}
