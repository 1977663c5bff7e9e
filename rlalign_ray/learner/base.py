"""One rank of a DeepSpeed data-parallel group (the policy learner or the critic).

Ranks form a torch.distributed group (gloo on CPU, NCCL on GPU) through DeepSpeed. Each
rank gets only its seeded share of the step's rows (``roles.split_rows``), cut from the step's
shards by the group's rank 0 (``split_for_ranks``); losses are normalised over the whole
mini-batch (all ranks, all micro-batches), so the gradient does not depend on the split.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from rlalign_ray.checkpoint import (
    load,
    other_ranks_file,
    rng_state,
    safe_checkpoint_engine,
    set_rng_state,
)
from rlalign_ray.config import Config, DeepSpeedRole
from rlalign_ray.data.batch import RolloutBatch, packed, pad_responses
from rlalign_ray.data.packing import row_tokens, split_largest, token_groups
from rlalign_ray.data.step_batches import open_batches
from rlalign_ray.errors import NonFiniteError
from rlalign_ray.learner.lora import save_merged
from rlalign_ray.models.loading import default_device, load_tokenizer, set_threads
from rlalign_ray.models.packing_probe import use_packing
from rlalign_ray.rollout.backends import sleeps
from rlalign_ray.storage import Storage, answer_probe


class DeepSpeedRank:
    def __init__(self, cfg: Config, rank: int, world_size: int, role: DeepSpeedRole):
        set_threads(role.resources.num_cpus)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg, self.role, self.rank, self.world_size = cfg, role, rank, world_size
        self.section = "critic" if role is cfg.critic else "learner"
        self.device = default_device(role.resources.num_gpus, f"{self.section}.resources.num_gpus")
        self.storage = Storage.from_config(cfg.trainer)  # where checkpoints go (storage.py)
        self.objective = cfg.objective  # the loss's settings, resolved (its normaliser: agg)
        self.engine: Any = None
        self.packing = role.packing  # off after ``setup`` if the model cannot pack exactly
        self.step = 0  # the training step being run (``train_step``)
        self.skipped_in_row = 0  # optimizer steps skipped one after another (non-finite)

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def ping(self) -> int:
        return self.rank

    def split_batches(self, parts, rows, layout, *objs):
        """The group's rank 0 cuts the step's batch into one part per rank (``rank_batches``)."""
        return rank_batches(parts, rows, layout, *objs)

    # ---- setup ------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a free port for the process group rendezvous."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build the model and wrap it in a DeepSpeed engine."""
        import deepspeed

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            # DeepSpeed puts the engine on cuda:LOCAL_RANK: the GPU Ray assigned this rank
            LOCAL_RANK=str(self.device.index or 0),
        )
        if master_addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = (
            self.role.backend
            if self.role.backend != "auto"
            else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            rank=self.rank,
            world_size=self.world_size,
            # a collective (all-reduce, gather) waiting longer than a whole actor call
            # may take ends with an error on every rank instead of hanging
            timeout=timedelta(seconds=self.cfg.run.call_timeout_s),
        )
        torch.manual_seed(self.cfg.run.seed)
        if self.role.zero_stage == 3:  # from_pretrained then loads each rank's shard only
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_zero3 = HfDeepSpeedConfig(self.ds_config())  # held: a weakref is read
        model = self.build_model()
        if self.role.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters
        if self.role.optimizer == "sgd":
            optimizer = torch.optim.SGD(trained, lr=self.role.lr)
        else:
            optimizer = torch.optim.AdamW(
                trained,
                lr=self.role.lr,
                betas=tuple(self.role.betas),
                weight_decay=self.role.weight_decay,
            )
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config()
        )
        if self.engine.lr_scheduler is not None:  # see ``lr_schedule``: skip the zero-lr start
            self.engine.lr_scheduler.step(lr_schedule(self.role, self.cfg)[1])
        if self.packing:
            self.packing = use_packing(self.engine.module, self.device, f"{self.section}.packing")
        return self.rank

    def release_cached_memory(self) -> None:
        """After a step's update, with sleeping generators on this GPU
        (a backend that sleeps, e.g. ``rollout.vllm.enable_sleep_mode``): hand the blocks torch keeps cached back to the
        driver, so that the engines can wake into them."""
        if self.device.type == "cuda" and sleeps(self.cfg.rollout):
            torch.cuda.empty_cache()

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses (DeepSpeed's scheduler sets it)."""
        return float(self.engine.get_lr()[0])

    @property
    def grad_accumulation(self) -> int:
        return self.cfg.mini_batch_size // (self.world_size * self.role.micro_batch_size)

    def ds_config(self) -> dict[str, Any]:
        mb, gas = self.role.micro_batch_size, self.grad_accumulation
        return {
            "train_micro_batch_size_per_gpu": mb,
            "gradient_accumulation_steps": gas,
            "train_batch_size": mb * gas * self.world_size,
            "zero_optimization": {"stage": self.role.zero_stage},
            "zero_allow_untested_optimizer": True,  # a torch optimizer: no op compilation
            "gradient_clipping": self.role.grad_clip,
            "bf16": {"enabled": self.role.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            **({"scheduler": lr_schedule(self.role, self.cfg)[0]} if self._scheduled else {}),
        }

    @property
    def _scheduled(self) -> bool:
        return self.role.lr_scheduler != "constant" or self.role.lr_warmup_steps > 1

    # ---- data ----------------------------------------------------------------------------
    def mini_batches(self, n: int, step: int):
        """Per epoch, this rank's local rows in shuffled mini-batches."""
        per_rank = self.cfg.mini_batch_size // self.world_size
        if n % per_rank:
            raise ValueError(
                f"{type(self).__name__} rank {self.rank}: {n} rows do not split into "
                f"mini-batches of {per_rank} per rank (learner.mini_batch_size="
                f"{self.cfg.mini_batch_size} over {self.world_size} ranks); a short last "
                "mini-batch would be an optimizer step the LR schedule does not count"
            )
        g = torch.Generator().manual_seed((self.cfg.run.seed * 1_000_003 + step) * 31 + self.rank)
        for _ in range(self.cfg.learner.update_epochs):
            order = torch.randperm(n, generator=g)
            for k in range(0, n, per_rank):
                yield order[k : k + per_rank]

    def micro_batches(self, batch: RolloutBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """``micro_batch_size`` rows each, or with ``max_tokens_per_micro_batch`` as many
        rows as fit that many prompt+response tokens: real ones when packing (first-fit
        decreasing), else trimmed, padded ones. A longer row is a micro-batch of its own."""
        budget = self.role.max_tokens_per_micro_batch
        if not budget:
            mb = self.role.micro_batch_size
            return [rows[i : i + mb] for i in range(0, len(rows), mb)]
        plen, rlen = batch.prompt_mask.sum(1)[rows], batch.response_len[rows]
        return [rows[g] for g in token_groups(plen, rlen, budget, self.packing)]

    def lockstep_micro_batches(self, batch: RolloutBatch, rows: torch.Tensor):
        """``micro_batches``, as many on every rank: with a token budget, ranks split their
        largest micro-batches until all run as many forward (and backward) calls as the rank
        with the most (ZeRO reduces inside backward and gathers in every ZeRO-3 forward);
        ranks hold equally many rows, so a rank can always split down to the most."""
        micro = self.micro_batches(batch, rows)
        if not self.role.max_tokens_per_micro_batch:
            return micro
        most = int(self.all_reduce(torch.tensor(len(micro)), "max"))
        if most == len(micro):
            return micro
        tokens = dict(zip(rows.tolist(), row_tokens(batch)[rows].tolist()))
        groups = split_largest([m.tolist() for m in micro], tokens, most)
        return [torch.tensor(g, dtype=torch.long) for g in groups]

    def weighted_micro_batches(self, batch: RolloutBatch, rows: torch.Tensor):
        """Micro-batches of ``rows`` (``lockstep_micro_batches``) with the loss scale that
        makes the gradient global."""
        mode = self.objective.agg
        micro = self.lockstep_micro_batches(batch, rows)
        counts = [count_for(mode, batch.response_mask[r]) for r in micro]
        total = (
            None
            if mode == "token-sum"
            else float(self.all_reduce(torch.tensor(sum(counts), dtype=torch.float64)))
        )
        return [(r, self.loss_scale(local, total)) for r, local in zip(micro, counts)]

    def loss_scale(self, local: float, total: float | None) -> float:
        """Weight of a micro-batch's loss so that the summed gradient is the global mean
        (``local / total`` of it), or the global sum when ``total`` is None: DeepSpeed
        divides by its (fixed) accumulation steps and averages over ranks."""
        share = 1.0 if total is None else local / max(total, 1.0)
        return share * self.world_size * self.grad_accumulation

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size > 1:
            x = x.to(self.device)
            dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x.cpu()

    def reduce_stats(self, stats: dict[str, list[float]]) -> dict[str, float]:
        """Mean of each statistic over micro-batches, then over ranks."""
        keys = sorted(stats)
        local = torch.tensor([float(np.mean(stats[k])) for k in keys], dtype=torch.float64)
        mean = self.all_reduce(local) / self.world_size
        return dict(zip(keys, mean.tolist()))

    # ---- non-finite losses and gradients: skip the optimizer step ----------------------
    @property
    def checks_grads(self) -> bool:
        """Whether DeepSpeed's optimizer wrapper (ZeRO 1-3, or bf16) discards a step with a
        non-finite gradient norm itself; stage 0 in fp32 steps a plain torch optimizer."""
        return self.role.zero_stage > 0 or self.role.bf16

    def agree_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (all ranks take the same branch)."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0)
        return not bool(self.all_reduce(bad, "max") > 0)

    def _finish_step(self, finite: bool) -> bool:
        """Take (or skip) the mini-batch's optimizer step; True when it was applied.

        Under ZeRO 1-3 (or bf16) every micro-batch ran its backward and ``engine.step()``;
        DeepSpeed's optimizer finds a non-finite gradient norm itself, discards the
        gradients and reports the step as not applied. Under stage 0 in fp32 (a plain torch
        optimizer, no such check) non-finite micro-batches ran no backward; here the gradient norm is checked
        too, and on either the gradients are dropped and ``engine.step()`` is not called
        (the optimizer, its step count and the weights stay as they were)."""
        if self.checks_grads:
            return finite and bool(self.engine.was_step_applied())
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else 0
        bad = torch.tensor(0.0 if finite and bool(torch.isfinite(torch.as_tensor(norm))) else 1.0)
        if self.all_reduce(bad, "max") > 0:
            self.engine.zero_grad()
            return False
        self.engine.step()
        return True

    def optimizer_step(self, batch: RolloutBatch, rows: torch.Tensor, micro_loss) -> bool:
        """One optimizer step over the mini-batch ``rows``: for each weighted micro-batch
        ``(i, r)``, ``micro_loss(i, r)`` returns its loss and a callback that records its
        statistics (called only when the loss is finite on every rank). Returns True when
        the step was skipped (a non-finite loss on any rank, or gradient norm; see
        ``_finish_step``); ``learner.max_skipped_steps`` of them in a row end the run."""
        micro = self.weighted_micro_batches(batch, rows)
        delegated, finite = self.checks_grads, True  # ZeRO/bf16 discard a bad step itself
        for i, (r, scale) in enumerate(micro):
            loss, record = micro_loss(i, r)
            ok = self.agree_finite(loss)
            finite = finite and ok
            boundary = i == len(micro) - 1
            self.engine.set_gradient_accumulation_boundary(boundary)
            if ok or delegated:
                self.engine.backward(loss * scale)
            if delegated or (ok and not boundary):  # stage 0's boundary: ``_finish_step``
                self.engine.step()
            if ok:
                record(loss, scale)
        return self._count_skip(not self._finish_step(finite))

    def _count_skip(self, skipped: bool) -> bool:
        """Count skipped steps in a row; ``learner.max_skipped_steps`` of them end the run."""
        self.skipped_in_row = self.skipped_in_row + 1 if skipped else 0
        limit = self.cfg.learner.max_skipped_steps  # the critic follows the learner's
        if limit and self.skipped_in_row >= limit:
            raise NonFiniteError(
                f"{type(self).__name__} rank {self.rank}: {self.skipped_in_row} optimizer "
                "steps in a row were skipped because the loss or the gradient norm was not "
                f"finite (step {self.step}); the "
                "training has diverged. Lower learner.lr, check the rewards and advantages, "
                "or raise learner.max_skipped_steps"
            )
        return skipped

    # ---- weights out ------------------------------------------------------------------
    def gathered(self, params=None):
        """Full values of ``params`` (default: all) on every rank (ZeRO-3 shards them)."""
        if self.role.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(
                list(self.engine.module.parameters()) if params is None else list(params)
            )
        return nullcontext()

    def get_weights(self) -> dict[str, np.ndarray]:
        with self.gathered():
            return {
                n: p.detach().cpu().float().numpy().copy()
                for n, p in self.engine.module.named_parameters()
            }

    def save_pretrained(self, path: str, merged: bool = False) -> str | None:
        """All ranks call this; rank 0 writes a folder ``from_pretrained`` loads (with LoRA:
        the adapter, which ``PeftModel.from_pretrained`` loads, and with ``merged`` also
        ``path/merged``, the adapters merged into the model). ``path``: a local folder or a
        URI (written on this node, then uploaded: ``storage.py``)."""
        if self.rank != 0:
            with self.gathered():
                return None
        with self.storage.writing(path, f"{self.section}{self.rank}") as local:
            with self.gathered():
                self.engine.module.save_pretrained(str(local), safe_serialization=True)
                if merged:
                    save_merged(self.engine.module, os.path.join(local, "merged"))
            tok = load_tokenizer(
                self.cfg.model.tokenizer or self.cfg.model.path, self.cfg.model.trust_remote_code
            )
            tok.save_pretrained(str(local))
            if merged:
                tok.save_pretrained(os.path.join(local, "merged"))
        return path

    # ---- resumable checkpoints ----------------------------------------------------------
    def save_checkpoint(self, path: str, tag: str) -> None:
        """All ranks call this: DeepSpeed writes the module, the optimizer and scheduler
        states (each rank its ZeRO shard), and each rank its random states. ``path``: a
        local folder, or a URI each rank uploads its own files to from its node."""
        with self.storage.writing(path, f"{self.section}{self.rank}") as local:
            self.engine.save_checkpoint(str(local), tag=tag, save_latest=False)
            torch.save(rng_state(), os.path.join(local, tag, f"rng_rank{self.rank}.pt"))
        self.all_reduce(torch.zeros(1))  # every rank's files are written when any returns

    def load_checkpoint(self, path: str, tag: str) -> None:
        """All ranks call this after ``setup``: the state ``save_checkpoint`` wrote (from a
        URI each rank downloads the shared files and its own shard only)."""
        safe_checkpoint_engine(self.engine)  # torch.load(weights_only=True) for every file
        mine = lambda rel: not other_ranks_file(rel, self.rank)  # noqa: E731
        with self.storage.reading(path, f"{self.section}{self.rank}", mine) as local:
            loaded, _ = self.engine.load_checkpoint(
                str(local), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if loaded is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {path}")
            rng = os.path.join(local, tag, f"rng_rank{self.rank}.pt")
            rng_states = load(rng) if os.path.exists(rng) else None  # none with more ranks
        sched = self.engine.lr_scheduler
        if sched is not None:  # the optimizer's lr as the restored schedule has it
            sched.step(sched.last_batch_iteration)
        if rng_states is not None:
            set_rng_state(rng_states)

    def probe_storage(self, output_dir: str, token: str) -> tuple:
        """Whether this rank sees the probe the driver wrote in ``output_dir`` and can write
        its own beside it (``storage.answer_probe``; asked before any training)."""
        return answer_probe(self.storage, output_dir, token, f"{self.section}{self.rank}")


def optimizer_steps(cfg: Config) -> int:
    """Optimizer steps in the whole run: ``trainer.steps`` x ``learner.update_epochs`` x
    mini-batches per batch (the critic follows the learner's schedule)."""
    return cfg.trainer.steps * cfg.learner.update_epochs * (cfg.batch_size // cfg.mini_batch_size)


def lr_schedule(role: DeepSpeedRole, cfg: Config) -> tuple[dict[str, Any], int]:
    """DeepSpeed's ``scheduler`` block for ``role.lr_scheduler`` and the scheduler iteration
    the first optimizer step starts from.

    Optimizer step s (1-based) uses the scheduler's value at iteration s - 1 + start: with
    warm-up W >= 2 steps (linear) the first step already trains at lr / W and step W at the full
    lr (DeepSpeed's iteration 0 would be a step at lr 0); with no warm-up (W <= 1; DeepSpeed
    warms up over at least 2 iterations) the schedule starts past its warm-up. The decay ends
    one iteration after the last step, so no step trains at lr 0: ``linear`` decays towards 0,
    ``cosine`` towards ``lr * lr_min_ratio``; ``constant`` with warm-up holds the lr after it
    (``constant`` without warm-up has no scheduler).
    """
    warm = role.lr_warmup_steps
    start = 1 if warm >= 2 else 2
    total = optimizer_steps(cfg) + start
    common = {"warmup_num_steps": max(warm, 2), "warmup_type": "linear"}
    if role.lr_scheduler == "cosine":
        params = {
            **common,
            "total_num_steps": total,
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": role.lr_min_ratio,
        }
        return {"type": "WarmupCosineLR", "params": params}, start
    params = {**common, "warmup_min_lr": 0.0, "warmup_max_lr": role.lr}
    if role.lr_scheduler == "linear":
        return {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": total}}, start
    return {"type": "WarmupLR", "params": params}, start


def count_for(mode: str, mask: torch.Tensor) -> float:
    """The normaliser of ``aggregate_loss(mode)`` for these rows: tokens or sequences
    (token-sum has none: 1)."""
    if mode == "token-mean":
        return float(mask.sum())
    if mode == "token-sum":
        return 1.0
    return float((mask.sum(-1) > 0).sum())


def rank_batches(parts: list[torch.Tensor], rows: torch.Tensor | None, layout: Any, *objs):
    """Join the step's batches (opened from ``objs`` by ``layout``, a
    ``data.step_batches.Layout``, or a count of the first objects) and their reference
    log-probs (the rest, if any), keep ``rows``, and cut one ``(RolloutBatch, (n, T) ref
    log-probs or None)`` per rank; a single part is returned bare (a Ray task with one
    return)."""
    batches, rest = open_batches(layout, objs)
    full = RolloutBatch.concat(batches)
    ref = pad_responses(rest) if rest else None
    if rows is not None:
        full, ref = full.select(rows), None if ref is None else ref[rows]
    out = [(full.select(p), None if ref is None else ref[p]) for p in parts]
    return out if len(out) > 1 else out[0]


def split_for_ranks(
    actor: Any,
    batches: Any,
    rows: torch.Tensor | None,
    ref_logprobs: list[Any] | None,
    parts: list[torch.Tensor],
) -> list[Any]:
    """One object ref per rank, cut by ``actor`` (the group's rank 0) from the step's batches
    (``data.step_batches.StepBatches``): token batches never pass through the driver and no
    other rank receives another rank's rows. An actor already running does it: a Ray task
    would often wait seconds for a fresh worker process to import torch."""
    out = actor.split_batches.options(num_returns=len(parts)).remote(
        [packed(p) for p in parts],
        packed(rows),
        batches.layout(),
        *batches.args(),
        *(ref_logprobs or []),
    )
    return out if len(parts) > 1 else [out]
