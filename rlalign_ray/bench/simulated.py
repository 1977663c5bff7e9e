"""Simulated actors: a bench harness for ``bench pipeline --simulate`` and ``bench scale``,
never used by training.

Those benchmarks run the real ``Trainer`` (its loop, ``Rollouts``, the pools, ``WeightSync``)
with these classes in place of the built-in ones (``simulated_topology``), so that they
measure the orchestration alone: each call sleeps for the time a ``Workload`` gives it
instead of computing, so the actors need almost no CPU and the driver gets the machine.
Each class answers every method the Trainer, the pools and ``WeightSync`` call on its role
(as ``Generator``, ``RewardScorer``, ``Reference`` and ``Learner`` do).

Generation time: ``gen`` is the step's generation time when its rows are spread evenly over
the generators and every sample has the mean length, so one row costs
``gen * generators / batch_rows`` seconds. Each sample's length is a factor drawn from the
tail distribution (lognormal with mean 1; 1 without a tail), seeded by its prompt and sample
number, so a static split and pulled chunks sample the same lengths. A chunk decodes its
rows together until its longest sample ends (as the HF backend does, every decode step
costs the whole batch): it takes ``rows * row cost * its longest factor``. One long sample
holds up its whole chunk, which is what makes a static split slow. With in-flight weight
updates (``rollout.inflight_updates``) a chunk sleeps decode step by decode step (one step
per token of its longest sample, each ``chunk time / steps``) and lets a load in between
two steps through the real ``LoadGate``: a long chunk goes on with the new version instead
of the load waiting for it, and each sample's tokens record the versions of their steps.

Torch stays out of the generator and reward processes (importing it costs about 130 MB of
private memory per process, which bounds how many actors fit on a machine): a generator
returns a ``SimulatedRollout`` (rows, version, lengths: all the simulated reward, reference
and learner read) instead of a ``RolloutBatch``, and what the driver or the learner read as
torch objects travels as ``Built`` values, built by the process that unpickles them (the
driver gets real ``ScoredShard``s).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlalign_ray.errors import ActorFailure, ConfigError

SECONDS = {"gen": "gen_s", "train": "train_s", "reward": "reward_s", "ref": "ref_s"}


@dataclass(frozen=True)
class Workload:
    """What each simulated call costs, in seconds (see the module doc for generation)."""

    gen_s: float = 0.0  # the step's generation, rows spread evenly, every length factor 1
    train_s: float = 0.0  # one train_step (every learner rank)
    tail_sigma: float = 0.0  # lognormal sigma of the samples' length factors (0: all 1)
    reward_s: float = 0.0  # one score call
    ref_s: float = 0.0  # one reference logprobs call
    batch_rows: int = 1  # rows of a step's batch: prompts_per_step * n_samples
    generators: int = 1
    tokens: int = 4  # response tokens of a sample of mean length (sizes the tiny tensors)

    @classmethod
    def parse(cls, text: str, batch_rows: int, generators: int) -> Workload:
        """``gen=0.2,train=0.3[,tail=lognormal:1.0][,reward=S][,ref=S]``."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            try:
                if key == "tail":
                    kind, _, sigma = value.partition(":")
                    if kind != "lognormal" or float(sigma) < 0:
                        raise ValueError
                    values["tail_sigma"] = float(sigma)
                elif key in SECONDS and float(value) >= 0:
                    values[SECONDS[key]] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    [
                        f"--simulate {text!r}: cannot read {part!r}; write "
                        "gen=S,train=S[,tail=lognormal:SIGMA][,reward=S][,ref=S] (seconds >= 0)"
                    ]
                ) from None
        return cls(**values, batch_rows=batch_rows, generators=generators)

    @property
    def row_s(self) -> float:
        return self.gen_s * self.generators / self.batch_rows

    def factors(self, index: int, n: int) -> list[float]:
        """Length factors of prompt ``index``'s ``n`` samples (mean 1)."""
        if self.tail_sigma <= 0:
            return [1.0] * n
        mu = -(self.tail_sigma**2) / 2
        return [random.Random(f"{index}/{j}").lognormvariate(mu, self.tail_sigma) for j in range(n)]

    def chunk_s(self, factors: Sequence[float]) -> float:
        """Seconds to sample rows of these length factors together."""
        return self.row_s * len(factors) * max(factors, default=0.0)


@dataclass
class SimulatedRollout:
    """What a simulated generator returns for a chunk, in place of a RolloutBatch."""

    version: int
    group_ids: list[int]  # the prompt's dataset index, per row
    lengths: list[int]  # response tokens, per row

    def __len__(self) -> int:
        return len(self.group_ids)


class Built:
    """``fn(*args)``, built by whichever process unpickles it: an actor without torch hands
    back a torch object this way (``fn`` must be importable)."""

    def __init__(self, fn: Any, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def scored_shard(scores: list[float], group_ids: list[int], lengths: list[int]) -> Any:
    """A ScoredShard with these scores, prompts and response lengths (zero log-probs)."""
    import torch

    from rlalign_ray.data.batch import ScoredShard

    s, n = torch.tensor(scores), torch.tensor(lengths, dtype=torch.long)
    mask = (torch.arange(max(lengths))[None, :] < n[:, None]).float()
    ids = torch.tensor(group_ids, dtype=torch.long)
    return ScoredShard(s, {"simulated": s.clone()}, ids, n, mask, torch.zeros_like(mask))


def zeros(rows: int, width: int) -> Any:
    import torch

    return torch.zeros(rows, width)


# ---- the actors --------------------------------------------------------------------------
class SimulatedGenerator:
    """Samples nothing: sleeps for the chunk's time and returns its SimulatedRollout."""

    work = Workload()

    def __init__(self, model: Any, rollout: Any, seed: int, rank: int = 0, max_prompt_tokens=512):
        from rlalign_ray.rollout.inflight import LoadGate  # torch-free

        self.rank, self.version, self.plan = rank, 0, None
        self.gate = LoadGate() if rollout is not None and rollout.inflight_updates else None

    def generate_chunk(
        self,
        items: list[Any],
        n_samples: int,
        greedy: bool = False,
        expected_version: int | None = None,
        seed: int | None = None,
    ) -> tuple[SimulatedRollout, dict[str, Any]]:
        t0 = time.perf_counter()
        if self.gate is None and expected_version not in (None, self.version):
            raise ActorFailure(
                f"simulated generator {self.rank} holds weight version {self.version}, the "
                f"driver expects {expected_version}"
            )
        factors = [f for it in items for f in self.work.factors(it.index, n_samples)]
        lengths = [max(1, round(f * self.work.tokens)) for f in factors]
        ids = [it.index for it in items for _ in range(n_samples)]
        info: dict[str, Any] = {"rows": len(ids), "tokens": sum(lengths)}
        if self.gate is None:
            time.sleep(self.work.chunk_s(factors))
            info["version"] = self.version
        else:
            info.update(self._decode(factors, lengths, expected_version))
        info["seconds"] = time.perf_counter() - t0
        return SimulatedRollout(info["version"], ids, lengths), info

    def _decode(self, factors: list[float], lengths: list[int], expected: int | None) -> dict:
        """In-flight updates: the chunk's time in decode steps, loads let in between; its
        info (oldest version, loads, each row's token versions summed)."""
        steps = max(lengths)
        step_s = self.work.chunk_s(factors) / steps
        with self.gate.sampling(expected) as run:
            at = []  # the version of each decode step
            for _ in range(steps):
                at.append(self.gate.between_steps())
                time.sleep(step_s)
        summary = {
            "oldest": [at[0]] * len(lengths),
            "sum": [sum(at[:n]) for n in lengths],
            "tokens": lengths,
        }
        return {"version": at[0], "inflight_loads": run.loads, "token_versions": summary}

    def weight_ranks(self) -> int:
        return 1

    def join_weight_sync(self, plan: Any, address: Any, rank: int) -> None:
        self.plan = plan

    def load_weights(self, handle: Any) -> int:
        if self.gate is not None:  # between two decode steps of the chunk in progress
            return self.gate.load(lambda: self._set_version(handle))
        return self._set_version(handle)

    def _set_version(self, handle: Any) -> int:
        self.version = handle.version if handle.is_last(self.plan) else -1
        return self.version

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def get_version(self) -> int:
        return self.version

    def ping(self) -> int:
        return self.rank


class SimulatedRewardScorer:
    """Scores 0 and 1 in turn (so every group's advantages are non-zero)."""

    work = Workload()

    def __init__(self, cfg: Any):
        pass

    def score(self, batch: SimulatedRollout) -> Built:
        time.sleep(self.work.reward_s)
        scores = [float((g + i) % 2) for i, g in enumerate(batch.group_ids)]
        return Built(scored_shard, scores, batch.group_ids, batch.lengths)

    def ping(self) -> int:
        return 1


class SimulatedReference:
    """Zero reference log-probs, shaped as the batch's responses."""

    work = Workload()

    def __init__(self, model: Any, cfg: Any, temperature: float):
        pass

    def logprobs(self, batch: SimulatedRollout) -> Built:
        time.sleep(self.work.ref_s)
        return Built(zeros, len(batch), max(batch.lengths))

    def ping(self) -> int:
        return 0


class SimulatedLearner:
    """A learner rank that trains nothing: joins no group, sleeps ``train_s`` per step, and
    publishes a one-parameter model through the real ``WeightSync``."""

    work = Workload()

    def __init__(self, cfg: Any, rank: int, world_size: int):
        self.cfg, self.rank = cfg, rank

    def address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def setup(self, master_addr: str, master_port: int) -> int:
        return self.rank

    def split_batches(self, parts: list[Any], rows: Any, layout: Any, *objs: Any) -> Any:
        """One small part per rank: its row count and the weight versions of the batches."""
        from rlalign_ray.data.step_batches import open_batches

        batches, _ = open_batches(layout, objs)
        versions = sorted({o.version for o in batches})
        out = [{"rows": len(p), "versions": versions} for p in parts]
        return out if len(out) > 1 else out[0]

    def train_step(self, part: Any, advantages: Any, kl_coef: float, step: int) -> dict:
        time.sleep(self.work.train_s)
        return {"loss": 0.0, "rows": float(part["rows"])}

    def weight_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [("simulated.weight", (1,))]

    def open_weight_sync(self, plan: Any) -> None:
        return None

    def join_weight_sync(self, address: Any) -> None:
        pass

    def seal_weight_sync(self) -> None:
        pass

    def publish_weights(self, bucket: int) -> None:
        return None

    def save_pretrained(self, path: str) -> None:
        pass

    def probe_storage(self, output_dir: str, token: str) -> tuple:
        """As a real rank: whether this node reaches ``output_dir`` (``trainers/outputs.py``)."""
        from rlalign_ray.storage import Storage, answer_probe

        storage = Storage.from_config(self.cfg.trainer)
        return answer_probe(storage, output_dir, token, f"learner{self.rank}")

    def ping(self) -> int:
        return self.rank


HOSTED_ROLES = ("generator", "reward", "reference")  # many to a process with per_host > 0
SIMULATED = {
    "generator": SimulatedGenerator,
    "reward": SimulatedRewardScorer,
    "reference": SimulatedReference,
    "learner": SimulatedLearner,
}


# ---- runs -----------------------------------------------------------------------------------
def simulated_topology(cfg: Any, work: Workload, per_host: int = 0) -> Any:
    """``cfg``'s topology with every role's class replaced by its simulated one, each
    carrying ``work`` (a subclass per run: Ray ships it by value). With ``per_host`` > 0
    the generator, reward and reference actors run ``per_host`` to a process
    (``bench/hosted.py``); the learner rank keeps a process of its own."""
    from rlalign_ray.bench.hosted import hosted
    from rlalign_ray.topology import Topology

    topo = Topology.from_config(cfg)
    for role, pool in topo.pools.items():
        if role not in SIMULATED:
            raise ConfigError([f"simulated runs have no {role} role; use an outcome estimator"])
        base = SIMULATED[role]
        pool.cls = type(base.__name__, (base,), {"work": work})
        if role in HOSTED_ROLES:
            pool.cls = hosted(pool.cls, per_host)
    return topo


def simulated_config(output_dir: str, steps: int, overrides: Sequence[str] = ()) -> Any:
    """A config for ``steps`` simulated steps (``bench_overrides``: no evaluation or
    checkpoints, metrics in ``output_dir/run``), synthetic prompts written to ``output_dir``,
    light actors (0.01 CPU each); the model and the reward function are never loaded.
    ``overrides`` come last."""
    from rlalign_ray.bench.common import bench_overrides
    from rlalign_ray.config import load_config

    prompts = Path(output_dir) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4096)))
    light = "{num_cpus: 0.01}"
    return load_config(
        None,
        [
            *bench_overrides(str(Path(output_dir) / "run"), steps),  # an empty run folder
            f"data.train={prompts}",
            "reward.rewards=[{type: function, path: 'rlalign_ray.rewards.builtin:arithmetic_exact'}]",
            f"rollout.resources={light}",
            f"reward.resources={light}",
            f"reference.resources={light}",
            f"learner.resources={light}",
            "sync.transport=object_store",  # the simulated actors build no transport
            *overrides,
        ],
    )
