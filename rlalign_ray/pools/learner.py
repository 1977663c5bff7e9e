"""The learner and critic groups: DeepSpeed data-parallel ranks, one actor each.

    exp = Experience(shards, None, scores, ref_logprobs)   # refs + small data
    old = learner.old_logprobs(exp, step).result()         # optional: (B, T), kept on the ranks
    exp = replace(exp, advantages=adv)                     # advantages computed from them
    fut = learner.update(exp, kl_coef, step)               # a Future of the metrics
    ...                                                    # generate meanwhile
    metrics = fut.result()

Each rank receives only its rows (one object per rank, cut from the shards' refs by rank
0 of the group), and outcome advantages travel as one value per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlalign_ray.config import Config, Placement, Resources
from rlalign_ray.data.batch import ScoredShard, packed
from rlalign_ray.data.step_batches import StepBatches
from rlalign_ray.learner.base import split_for_ranks
from rlalign_ray.pools.base import ActorPool, Future
from rlalign_ray.roles import ROLES, split_rows
from rlalign_ray.runtime.placement import get


@dataclass(frozen=True)
class Experience:
    """One step's samples as the driver holds them: refs to the token batches (which never
    pass through the driver), the small per-row data, and what the update needs. Every
    field has one meaning; a step's Experience is never changed in place (the trainer
    adds the advantages with ``dataclasses.replace``)."""

    # the step's RolloutBatches, in a fixed order: their ObjectRefs (a list), or a
    # ``data.step_batches.StepBatches`` (as the generator pools build it); kept as the latter
    batches: StepBatches | Sequence[Any]
    rows: torch.Tensor | None  # rows of the joined batches that form the step (None: all)
    scores: ScoredShard  # outcome of those rows
    ref_logprobs: list[Any] | None  # ObjectRefs of (B_i, T_i) reference log-probs per batch
    stats: dict[str, float] = field(default_factory=dict)
    advantages: torch.Tensor | None = None  # (B, T), or (B,) one value per row
    returns: torch.Tensor | None = None  # (B, T) the critic's targets (PPO)
    values: torch.Tensor | None = None  # (B, T) the critic's values they came with (PPO)

    def __post_init__(self) -> None:
        if not isinstance(self.batches, StepBatches):
            object.__setattr__(self, "batches", StepBatches(self.batches))

    def batch_refs(self, timeout_s: float) -> list[Any]:
        """ObjectRefs of the step's RolloutBatches, in order."""
        return self.batches.batch_refs(timeout_s)

    @property
    def shards(self) -> list[Any]:
        """Deprecated: ``batch_refs``."""
        warnings.warn(
            "Experience.shards is deprecated; use Experience.batch_refs(timeout_s)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.batch_refs(600.0)


class DeepSpeedGroup(ActorPool):
    """Ranks that form a process group; ``started`` runs the rendezvous at rank 0."""

    restartable = False  # a dead rank restarts the group (run.max_learner_restarts)

    def __init__(
        self,
        cfg: Config,
        world_size: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
    ):
        super().__init__(cfg, world_size, resources, placement, cls, name)

    def actor_args(self, i: int) -> tuple:
        return (self.cfg, i, self.spec.num_actors)

    def started(self) -> None:
        addr, port = get(self.actors[0].address.remote(), f"{self.name} rank 0", self.timeout_s)
        self.gather("setup", addr, port)

    def check_split(self, n: int) -> None:
        """A batch of ``n`` rows must split into whole mini-batches, each over every rank in
        whole micro-batches: no row is dropped and the LR schedule counts every optimizer
        step. The public API's callers (custom loops) learn it here, not from a silently
        smaller update."""
        c = self.cfg
        mini = c.mini_batch_size
        if n and n % mini == 0 and mini % self.spec.num_actors == 0:
            return
        raise ValueError(
            f"{self.name}: a batch of {n} rows does not split into mini-batches of "
            f"{mini} (learner.mini_batch_size; 0 means the configured batch, rollout."
            f"prompts_per_step * rollout.n_samples = {c.batch_size}) over {self.spec.num_actors} "
            f"ranks; give it a multiple of {mini} rows, or set learner.mini_batch_size to a "
            f"divisor of {n} that is a multiple of the ranks x micro_batch_size"
        )

    def rows(self, exp: Experience, step: int) -> list[torch.Tensor]:
        """This step's rows per rank: a seeded split, balanced by tokens when the role packs
        its micro-batches (``roles.split_rows``)."""
        packing = getattr(self.cfg, ROLES[self.role].section).packing
        lengths = exp.scores.row_tokens() if packing else None
        return split_rows(len(exp.scores), len(self.actors), self.cfg.run.seed, step, lengths)

    def parts(self, exp: Experience, step: int, ref_logprobs: list[Any] | None):
        """This step's rows per rank and each rank's batch ref (cut by rank 0)."""
        self.check_split(len(exp.scores))
        rows = self.rows(exp, step)
        return rows, split_for_ranks(self.actors[0], exp.batches, exp.rows, ref_logprobs, rows)

    def save(self, path: str, merged: bool = False) -> None:
        """Every rank takes part (ZeRO-3 gathers); rank 0 writes a Hugging Face folder
        (with LoRA the adapter, and with ``merged`` also ``path/merged``)."""
        args = (str(path), True) if merged else (str(path),)
        get(self.call("save_pretrained", *args), f"{self.name}: saving {path}", self.timeout_s)

    def save_checkpoint(self, path: str, tag: str = "ds") -> None:
        """DeepSpeed's checkpoint of every rank (optimizer state, ZeRO shards) in ``path``."""
        get(
            self.call("save_checkpoint", str(path), tag),
            f"{self.name}: checkpointing to {path}",
            self.timeout_s,
        )

    def load_checkpoint(self, path: str, tag: str = "ds") -> None:
        get(
            self.call("load_checkpoint", str(path), tag),
            f"{self.name}: loading the checkpoint in {path}",
            self.timeout_s,
        )


class LearnerGroup(DeepSpeedGroup):
    """The policy's ranks (``learner/learner.py``'s ``Learner`` by default); also the
    source of every weight sync (``WeightSync``)."""

    role = "learner"

    def old_logprobs(self, exp: Experience, step: int) -> Future:
        """(B, T) log-probs of the step's rows under the policy before its update, as the
        learner computes them (for the in-reward KL). Each rank keeps its rows' (cut once)
        and ``update`` of the same step uses them instead of computing them again."""
        rows, parts = self._parts_for(exp, step)
        self._held = {step: (exp, rows, parts)}  # one step at a time
        calls = [r.old_logprobs.remote(p, step) for r, p in zip(self.actors, parts)]
        return Future(calls, f"{self.name} old log-probs", _join_rows(exp, rows))

    def update(
        self, exp: Experience, kl_coef: float, step: int, per_sequence: bool = False
    ) -> Future:
        """One policy update on ``exp`` with its ``advantages``; a Future of rank 0's
        metrics (``train/...``). With ``per_sequence``, (B, T) advantages holding one value
        per row travel as (B,). Reference log-probs go with the rows unless the KL is in
        the reward."""
        if exp.advantages is None:
            raise ValueError(f"{self.name}.update: the Experience has no advantages")
        held, rows, parts = getattr(self, "_held", {}).pop(step, (None, None, None))
        if held is None or held.batches != exp.batches:
            rows, parts = self._parts_for(exp, step)
        advantages = exp.advantages
        if per_sequence and advantages.dim() == 2:
            first = exp.scores.response_mask.argmax(1, keepdim=True)  # a token of each row
            advantages = advantages.gather(1, first).squeeze(1)
        calls = [
            r.train_step.remote(p, packed(advantages[k]), kl_coef, step)
            for r, p, k in zip(self.actors, parts, rows)
        ]
        return Future(
            calls, f"{self.name} update", lambda out: {f"train/{k}": v for k, v in out[0].items()}
        )

    def _parts_for(self, exp: Experience, step: int):
        refs = None if self.cfg.algorithm.kl_in_reward else exp.ref_logprobs
        return self.parts(exp, step, refs)


class CriticGroup(DeepSpeedGroup):
    """The value model's ranks (PPO)."""

    role = "critic"

    def values(self, exp: Experience, step: int) -> Future:
        """(B, T) values of the step's rows. The group keeps each rank's rows (refs, cut
        once) for ``update`` of the same step; ``exp`` is not changed."""
        rows, parts = self.parts(exp, step, None)
        self._parts = {step: (exp, parts)}  # one step at a time: the previous one is done
        calls = [c.values.remote(p) for c, p in zip(self.actors, parts)]
        return Future(calls, f"{self.name} values", _join_rows(exp, rows))

    def update(self, exp: Experience, step: int) -> Future:
        """One value update on ``exp``'s rows towards its ``returns``, from the ``values``
        they came with (after ``values(exp, step)``, on the same batch)."""
        held, parts = getattr(self, "_parts", {}).pop(step, (None, None))
        if held is None or held.batches != exp.batches:
            raise ValueError(f"{self.name}.update: call values(exp, step) for this step first")
        if exp.returns is None or exp.values is None:
            raise ValueError(f"{self.name}.update: the Experience has no returns and values")
        returns, values = exp.returns, exp.values
        rows = self.rows(exp, step)
        calls = [
            c.train_step.remote(p, packed(returns[k]), packed(values[k]), step)
            for c, p, k in zip(self.actors, parts, rows)
        ]
        return Future(
            calls, f"{self.name} update", lambda out: {f"critic/{k}": v for k, v in out[0].items()}
        )


def _join_rows(exp: Experience, rows: list[torch.Tensor]):
    """The Future's join of per-rank (n_k, T_k) tensors into one (B, T) like the batch's
    mask, each rank's rows in their places (zeros beyond a rank's width)."""

    def join(out: list[torch.Tensor]) -> torch.Tensor:
        full = torch.zeros_like(exp.scores.response_mask)
        for r, v in zip(rows, out):
            full[r, : v.shape[1]] = v
        return full

    return join
