"""A custom actor topology through the Python API.

- generators spread across nodes, two of them;
- the reference model colocated with learner rank 0 (it shares that rank's bundle:
  on a GPU cluster, the same GPU);
- a user-defined reward actor class that adds a brevity bonus to the configured rewards.

    python launch/examples/custom_topology.py [--steps 2] [--output-dir runs/custom]

The same training config runs unchanged on any topology; only placement and classes change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rlalign_ray.config import Placement, Resources, load_config
from rlalign_ray.data.batch import RolloutBatch, ScoredShard
from rlalign_ray.rewards.scorer import RewardScorer
from rlalign_ray.topology import Pool, Topology
from rlalign_ray.trainers import Trainer

REPO = Path(__file__).resolve().parents[2]


class BrevityScorer(RewardScorer):
    """The configured rewards, plus 0.1 for answers of at most 4 tokens."""

    def score(self, batch: RolloutBatch) -> ScoredShard:
        out = super().score(batch)
        bonus = 0.1 * (batch.response_len <= 4).float()
        out.breakdown["brevity"] = bonus
        out.scores = out.scores + bonus
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--output-dir", default="runs/custom_topology")
    args = p.parse_args()

    cfg = load_config(
        REPO / "configs/demo_cpu.yaml",
        [
            f"trainer.steps={args.steps}",
            f"trainer.output_dir={args.output_dir}",
            "trainer.eval_every=0",
            "data.eval_limit=16",
            "trainer.progress_bar=false",
            "rollout.prompts_per_step=8",
            "learner.mini_batch_size=64",
            "learner.micro_batch_size=16",
            f"data.train={REPO / 'configs/data/arith_train.jsonl'}",
            f"data.eval={REPO / 'configs/data/arith_eval.jsonl'}",
        ],
    )
    topo = Topology.from_config(cfg)
    topo.pools["generator"] = Pool(2, Resources(num_cpus=0.5), Placement(strategy="SPREAD"))
    topo.pools["reward"] = Pool(1, Resources(num_cpus=0.25), cls=BrevityScorer)
    topo.pools["learner"] = Pool(2, Resources(num_cpus=0.5))
    topo.pools["reference"] = Pool(1, Resources(num_cpus=0.25), Placement(colocate_with="learner"))
    final = Trainer(cfg, topology=topo).fit()
    print(
        f"custom topology: reward {final['train/reward_mean']:.3f}, "
        f"brevity bonus {final['train/reward/brevity']:.3f}, version {final['weights/version']}"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
