"""The reward scorer: every configured reward on a rollout shard, summed with weights.

A plain class; ``pools/reward.py`` runs it as Ray actors (``runtime/placement.py`` makes them).
Each reward call runs at most ``reward.timeout_s``; a NaN or infinite value is handled as
``reward.on_nonfinite`` says: ``error`` stops the run naming the reward and the sample,
``zero`` scores it 0, ``drop_group`` marks its row (total NaN) so that the driver leaves
its prompt's whole group out of the step. In the last two modes the shard's breakdown
carries a ``NONFINITE`` entry (1.0 where a reward was not finite) for the driver's count.

A reward may return ``None`` for a sample it does not apply to (TRL's convention): the
sample's total is the weighted sum of the rewards that are not ``None`` (its breakdown
entry is NaN, left out of the logged mean). A sample that no reward applies to is
handled as a non-finite one, by ``reward.on_nonfinite`` (``zero`` scores it 0, as TRL's
``nansum`` does).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from rlalign_ray.config import RewardConfig
from rlalign_ray.data.batch import NONFINITE, RolloutBatch, ScoredShard
from rlalign_ray.errors import RewardError
from rlalign_ray.models.loading import default_device, set_threads
from rlalign_ray.rewards.sources import RewardInputs, load_components

ENV_REWARD = "env_reward"  # columns a multi-turn generator adds (rollout/generator.py)
ENV_COLUMNS = (ENV_REWARD, "env_turns")


class RewardScorer:
    def __init__(self, cfg: RewardConfig):
        set_threads(cfg.resources.num_cpus)
        device = default_device(cfg.resources.num_gpus, "reward.resources.num_gpus")
        self.cfg = cfg
        self.sources = [part for spec in cfg.rewards for part in load_components(spec, device)]
        names = [src.name for src, _ in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(
                f"reward names must be unique, got {names}; set reward.rewards[i].name"
            )

    def score(self, batch: RolloutBatch) -> ScoredShard:
        breakdown: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch))
        bad_rows = torch.zeros(len(batch), dtype=torch.bool)
        applies = torch.zeros(len(batch), dtype=torch.bool)
        inputs = RewardInputs.from_batch(batch)
        inputs.columns = {k: v for k, v in inputs.columns.items() if k not in ENV_COLUMNS}
        env = batch.columns.get(ENV_REWARD)
        if env is not None:  # multi-turn: the environment's rewards (env.reward), weight 1
            breakdown["env"] = torch.tensor(env, dtype=torch.float32)
            total += breakdown["env"]
            applies[:] = True
        for source, weight in self.sources:
            raw = self._call(source, inputs, batch)
            na = torch.tensor([v is None for v in raw], dtype=torch.bool)
            values = torch.tensor(
                [float("nan") if v is None else v for v in raw], dtype=torch.float32
            )
            bad = ~torch.isfinite(values) & ~na
            if bad.any():
                self._nonfinite(getattr(source, "path", "") or source.name, values, bad, batch)
                values = values.masked_fill(bad, 0.0)
                bad_rows |= bad
            applies |= ~na
            breakdown[source.name] = values
            total += weight * values.nan_to_num(0.0)
        if not applies.all():
            none = ~applies
            self._none(none, batch)
            bad_rows |= none
        if self.cfg.on_nonfinite != "error":
            breakdown[NONFINITE] = bad_rows.float()
            if self.cfg.on_nonfinite == "drop_group":
                total = total.masked_fill(bad_rows, float("nan"))
        return ScoredShard(
            scores=total,
            breakdown=breakdown,
            group_ids=batch.group_ids,
            response_len=batch.response_len,
            response_mask=batch.response_mask,
            logprobs=batch.logprobs,
        )

    def _call(self, source: Any, inputs: RewardInputs, batch: RolloutBatch) -> list[Any]:
        """``source`` on the batch, in a thread that may run ``reward.timeout_s`` at most
        (a hung reward function cannot be stopped, but the run ends with its name)."""
        limit = self.cfg.timeout_s
        args = (inputs,)
        if not limit:
            return source(*args)
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["values"] = source(*args)
            except BaseException as e:  # re-raised in the caller's thread
                out["error"] = e

        worker = threading.Thread(target=run, name=f"reward-{source.name}", daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            raise RewardError(
                f"reward {source.name!r} did not return within {limit:g}s (reward.timeout_s) "
                f"on a batch of {len(batch)}; first prompt {_short(batch.prompts[0])}, "
                f"completion {_short(batch.completions[0])}. Make it faster or raise "
                "reward.timeout_s"
            )
        if "error" in out:
            raise out["error"]
        return out["values"]

    def _nonfinite(self, name: str, values: torch.Tensor, bad: torch.Tensor, batch) -> None:
        """With ``on_nonfinite: error``: stop, naming the reward and the first bad sample."""
        if self.cfg.on_nonfinite != "error":
            return
        i = int(bad.nonzero()[0])
        raise RewardError(
            f"reward {name!r} returned a non-finite value {float(values[i])} for sample {i} "
            f"of a batch of {len(batch)} ({int(bad.sum())} non-finite in all; prompt "
            f"{_short(batch.prompts[i])}, completion {_short(batch.completions[i])}). Fix "
            "the reward, or set reward.on_nonfinite: zero or drop_group"
        )

    def _none(self, none: torch.Tensor, batch: RolloutBatch) -> None:
        """With ``on_nonfinite: error``: stop when no reward applies to a sample."""
        if self.cfg.on_nonfinite != "error":
            return
        i = int(none.nonzero()[0])
        names = ", ".join(repr(getattr(s, "path", "") or s.name) for s, _ in self.sources)
        raise RewardError(
            f"every reward ({names}) returned None for sample {i} of a batch of {len(batch)} "
            f"({int(none.sum())} such samples in all; prompt {_short(batch.prompts[i])}, "
            f"completion {_short(batch.completions[i])}, columns "
            f"{ {k: v[i] for k, v in batch.columns.items()} }), so it has no reward. Make "
            "some reward apply to every sample, or set reward.on_nonfinite: zero (score it "
            "0, as TRL does) or drop_group"
        )

    def ping(self) -> int:
        return len(self.sources)


def _short(text: str, n: int = 200) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
