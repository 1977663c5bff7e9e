"""Driver for the multi-node tests, run as its own process: Ray reads the cluster's token
settings when it is imported, so a client of a token-auth cluster starts with them set.

    python multinode_driver.py {spread|node_loss} MODEL OUTPUT_DIR CLUSTER_ENV_FILE
Prints one JSON line: where each role's bundles were placed, or the error message.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest

from conftest import TEST_ENV, small_config  # noqa: E402

from rlalign_ray.config import Placement, Resources, config_from_dict  # noqa: E402
from rlalign_ray.errors import ActorFailure  # noqa: E402
from rlalign_ray.topology import Pool, Topology  # noqa: E402
from rlalign_ray.trainers import Trainer  # noqa: E402


class RecordingTrainer(Trainer):
    """Reads Ray's placement-group table once the actors are up."""

    worker_pid = 0

    def start(self):
        import ray

        super().start()
        self.where = {}
        for role, pool in self.pools.items():
            if pool.placement_group is not None:
                table = ray.util.placement_group_table(pool.placement_group)
                self.where[role] = [table["bundles_to_node_id"][i] for i in range(len(pool.actors))]

    def broadcast(self, version):
        out = super().broadcast(version)
        if version == 1 and self.worker_pid:
            node_leaves(self.worker_pid, self.node_id)
        return out


def node_leaves(pid: int, node_id: str, timeout_s: float = 120.0) -> None:
    """Kill a node's processes (its own session) and wait until Ray marks it dead."""
    import time

    import ray

    os.killpg(os.getpgid(pid), signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            return
        time.sleep(1)


def main() -> None:
    mode, model, output_dir, env_file = sys.argv[1:5]
    state = dict(
        line.split("=", 1)
        for line in Path(env_file).read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    import ray

    ray.init(address=state["RAY_ADDRESS"], runtime_env=TEST_ENV, logging_level="WARNING")
    nodes = {
        name: n["NodeID"]
        for n in ray.nodes()
        if n["Alive"]
        for name in ("node_head", "node_a", "node_b")
        if name in n["Resources"]
    }
    cfg = config_from_dict(
        small_config(
            model,
            output_dir,
            algorithm={"kl_coef": 0.0},
            learner={"world_size": 2, "micro_batch_size": 2},
            trainer={"steps": 2 if mode == "spread" else 4},
            # a lost node's generator bundle has nowhere to go: the replacement gives up soon
            run={"placement_timeout_s": 60 if mode == "spread" else 20},
        )
    )
    topo = Topology.from_config(cfg)
    topo.pools["generator"] = Pool(
        2, Resources(num_cpus=0.5, custom={"gen_slot": 1}), Placement(strategy="SPREAD")
    )
    topo.pools["learner"] = Pool(
        2, Resources(num_cpus=0.5, custom={"learner_slot": 1}), Placement(strategy="PACK")
    )
    topo.pools["reward"] = Pool(1, Resources(num_cpus=0.25))
    trainer = RecordingTrainer(cfg, topology=topo)
    if mode == "node_loss":
        trainer.worker_pid, trainer.node_id = int(state["WORKER_a_PID"]), nodes["node_a"]
    result = {"nodes": nodes}
    try:
        trainer.fit()
    except ActorFailure as e:
        result["error"] = str(e)
    result["where"] = trainer.where
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
