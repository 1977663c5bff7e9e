"""A training loop of your own on the pool API (``rlalign_ray.pools``).

- a generator pool whose idle actors pull small chunks of prompts;
- two reward pools of different classes on different placements: the configured
  arithmetic reward (the built-in scorer, in its own placement group) and a
  user-defined ``LengthJudge`` that shares the learner's bundle;
- the learner group, and a weight sync from it to the generators after every update.

Every chunk is scored by both pools as soon as it lands; the rewards are combined with
weights, GRPO advantages are computed on the driver, and each step appends a line of
metrics to ``<output-dir>/metrics.jsonl``.

    python launch/examples/custom_loop.py [--steps 2] [--output-dir runs/custom_loop]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import ray
import torch

from rlalign_ray.algorithms import outcome_advantages
from rlalign_ray.config import Config, Placement, Resources, RewardConfig, load_config
from rlalign_ray.data.batch import RolloutBatch, ScoredShard
from rlalign_ray.data.prompts import PromptSampler, load_prompts
from rlalign_ray.pools import (
    ActorPool,
    Experience,
    GeneratorPool,
    LearnerGroup,
    RewardPool,
    WeightSync,
    get,
    launch,
)

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = {"correct": 1.0, "brevity": 0.1}  # how the two pools' rewards combine


class LengthJudge:
    """A reward actor of its own: 1 for answers of at most 4 tokens, else 0. It answers
    what a reward pool calls: ``ping`` and ``score(RolloutBatch) -> ScoredShard``."""

    def __init__(self, reward_cfg: RewardConfig):
        self.max_tokens = 4

    def ping(self) -> int:
        return 1

    def score(self, batch: RolloutBatch) -> ScoredShard:
        short = (batch.response_len <= self.max_tokens).float()
        return ScoredShard(
            short,
            {"brevity": short},
            batch.group_ids,
            batch.response_len,
            batch.response_mask,
            batch.logprobs,
        )


def main() -> None:
    args = parse_args()
    cfg = demo_config()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = PromptSampler(load_prompts(cfg.data.train, cfg.data.prompt_key), cfg.run.seed)
    gen, rewards, judge, learner = make_pools(cfg)

    with launch(cfg.run, gen, rewards, judge, learner), open(out / "metrics.jsonl", "w") as log:
        for pool in (rewards, judge, learner):
            print(f"pool {pool.name}: {pool.spec.cls.__name__}, {where(pool)}")
        sync = WeightSync(cfg.sync, cfg.generator_dtype, learner, gen)
        sync.setup()
        for step in range(1, args.steps + 1):
            row = train_step(cfg, step, sampler, gen, rewards, judge, learner, sync)
            log.write(json.dumps(row) + "\n")
            log.flush()
    print(
        f"custom loop: {args.steps} steps, correct {row['reward/correct']:.3f}, "
        f"brevity {row['reward/brevity']:.3f}, loss {row['train/loss']:.4f}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--output-dir", default="runs/custom_loop")
    return p.parse_args()


def demo_config() -> Config:
    """The CPU demo config, made small: no KL term, 8 prompts a step, arithmetic data."""
    return load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            "algorithm.kl_coef=0",  # no KL term: no reference pool
            "rollout.prompts_per_step=8",
            "learner.mini_batch_size=32",
            "learner.micro_batch_size=16",
            "learner.resources.num_cpus=1",
            f"data.train={REPO / 'configs/data/arith_train.jsonl'}",
            f"data.eval={REPO / 'configs/data/arith_eval.jsonl'}",
        ],
    )


def make_pools(cfg: Config) -> tuple[GeneratorPool, RewardPool, RewardPool, LearnerGroup]:
    """The generator pool, the two reward pools and the learner group (not started yet)."""
    gen = GeneratorPool(cfg)
    rewards = RewardPool(cfg)  # the configured rewards, in a placement group of its own
    judge = RewardPool(
        cfg,
        name="judge",
        cls=LengthJudge,
        resources=Resources(num_cpus=0.25),
        placement=Placement(colocate_with="learner"),  # shares the learner's bundle
    )
    learner = LearnerGroup(cfg)
    return gen, rewards, judge, learner


def train_step(
    cfg: Config,
    step: int,
    sampler: PromptSampler,
    gen: GeneratorPool,
    rewards: RewardPool,
    judge: RewardPool,
    learner: LearnerGroup,
    sync: WeightSync,
) -> dict:
    """One step: generate, score, advantages, update, sync; returns its metrics row."""
    r = cfg.rollout
    t0 = time.perf_counter()
    # 1. generate: chunks of 2 prompts, pulled by idle generators
    chunks = gen.chunks(
        sampler.next(r.prompts_per_step), r.n_samples, step=step, chunk_size=2, seed=step
    )
    # 2. score every chunk on both reward pools as it lands (refs: no tokens here)
    scored, judged = {}, {}
    for c in gen.as_completed(chunks):
        scored[c.id], judged[c.id] = rewards.score(c.ref), judge.score(c.ref)
    s = ScoredShard.concat(get([scored[c.id] for c in chunks], "reward pool"))
    b = ScoredShard.concat(get([judged[c.id] for c in chunks], "judge pool"))
    total = WEIGHTS["correct"] * s.scores + WEIGHTS["brevity"] * b.scores
    # 3. GRPO advantages over each prompt's n samples
    groups = torch.arange(len(total)) // r.n_samples
    adv = outcome_advantages("grpo", total, groups, s.response_mask)
    # 4. update the policy on the chunks' batches (in request order), then sync
    scores = dataclasses.replace(s, scores=total)
    exp = Experience([c.ref for c in chunks], None, scores, None, advantages=adv)
    metrics = learner.update(exp, 0.0, step, per_sequence=True).result()
    synced = sync.sync(step)  # every generator now samples with version `step`
    return {
        "step": step,
        "reward/correct": float(s.scores.mean()),
        "reward/brevity": float(b.scores.mean()),
        "reward/total": float(total.mean()),
        **metrics,
        "weights/version": step,
        "weights/bytes": synced,
        "time/step_s": time.perf_counter() - t0,
    }


def where(pool: ActorPool) -> str:
    """The placement group each of the pool's actors runs in, as Ray reports it."""
    ids = ray.get(
        [
            a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_placement_group_id())
            for a in pool.actors
        ]
    )
    return "placement groups " + ",".join(ids)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
