"""One rank of the DeepSpeed learner group: the policy update.

A plain class; ``rlalign_ray.runtime.actors`` runs one per rank as a Ray actor. Ranks
form a torch.distributed group (gloo on CPU, NCCL on GPU) through DeepSpeed.

Loss normalisation is global: each micro-batch's loss is weighted by its share of the
mini-batch's tokens (or sequences) over all ranks, so the gradient is the same whatever
the split into ranks and micro-batches.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from rlalign_ray.algorithms import aggregate_loss, entropy_from_logits, kl_penalty, masked_mean
from rlalign_ray.algorithms import policy_loss
from rlalign_ray.config import Config
from rlalign_ray.data.batch import RolloutBatch, pad_responses
from rlalign_ray.models.loading import (
    batch_logprobs, default_device, load_causal_lm, load_tokenizer, response_logits, set_threads,
    token_logprobs,
)
from rlalign_ray.sync.weights import TRANSPORTS, WeightHandle


class Learner:
    def __init__(self, cfg: Config, rank: int, world_size: int):
        set_threads(cfg.learner.resources.num_cpus)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = default_device()
        self.engine: Any = None
        self.transport = TRANSPORTS["object_store"]()

    # ---- setup ------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a free port for the process group rendezvous."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, load the policy and wrap it in a DeepSpeed engine."""
        import deepspeed

        lc = self.cfg.learner
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if master_addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = lc.backend if lc.backend != "auto" else (
            "nccl" if self.device.type == "cuda" else "gloo")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=self.rank, world_size=self.world_size)
        torch.manual_seed(self.cfg.run.seed)
        model = load_causal_lm(self.cfg.model.path, self.cfg.model.dtype,
                               self.cfg.model.trust_remote_code)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=tuple(lc.betas),
                                      weight_decay=lc.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=self.ds_config())
        return self.rank

    def ds_config(self) -> dict[str, Any]:
        lc = self.cfg.learner
        gas = self.cfg.mini_batch_size // (self.world_size * lc.micro_batch_size)
        return {
            "train_micro_batch_size_per_gpu": lc.micro_batch_size,
            "gradient_accumulation_steps": gas,
            "train_batch_size": lc.micro_batch_size * gas * self.world_size,
            "zero_optimization": {"stage": lc.zero_stage},
            "gradient_clipping": lc.grad_clip,
            "bf16": {"enabled": lc.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    # ---- the update -------------------------------------------------------------------
    def train_step(self, shards: list[Any], advantages: torch.Tensor,
                   ref_logprobs: list[Any] | None, step: int) -> dict[str, float]:
        """One batch: ``update_epochs`` passes of mini-batches over this rank's rows.

        shards: object refs of the step's RolloutBatch shards, in the driver's order.
        advantages: (B,) or (B, T) over the concatenated shards.
        ref_logprobs: object refs of the reference log-probs per shard, or None.
        """
        import ray

        full = RolloutBatch.concat(ray.get(shards))
        rows = self._my_rows(len(full), step)
        batch = full.select(rows)
        adv = advantages[rows]
        ref = pad_responses(ray.get(ref_logprobs))[rows] if ref_logprobs else None
        a, lc = self.cfg.algorithm, self.cfg.learner
        temp = self.cfg.rollout.temperature
        self.engine.eval()
        if a.use_behaviour_logprobs:
            old = batch.logprobs
        else:
            old = batch_logprobs(self.engine.module, batch, temp, lc.micro_batch_size, self.device)
        mask = batch.response_mask
        stats: dict[str, list[float]] = defaultdict(list)
        stats["logprob_mismatch"].append(
            float(masked_mean((old - batch.logprobs).abs(), mask)))
        self.engine.train()
        mini_local = self.cfg.mini_batch_size // self.world_size
        g = torch.Generator().manual_seed(hash((self.cfg.run.seed, step, self.rank)) % 2**31)
        for _ in range(lc.update_epochs):
            order = torch.randperm(len(batch), generator=g)
            for k in range(0, len(batch), mini_local):
                self._mini_batch(batch, order[k : k + mini_local], old, adv, ref, stats)
        return self._reduce(stats)

    def _mini_batch(self, batch, rows, old, adv, ref, stats) -> None:
        a, lc = self.cfg.algorithm, self.cfg.learner
        gas = len(rows) // lc.micro_batch_size
        counts = [self._count(batch.response_mask[rows[i : i + lc.micro_batch_size]])
                  for i in range(0, len(rows), lc.micro_batch_size)]
        total = self._all_reduce_sum(torch.tensor(sum(counts), dtype=torch.float64))
        for i, local in zip(range(0, len(rows), lc.micro_batch_size), counts):
            r = rows[i : i + lc.micro_batch_size]
            mb = batch.select(r)
            mask = mb.response_mask.to(self.device)
            logits = response_logits(self.engine, mb, self.device)
            logp = token_logprobs(logits, mb.response_ids.to(self.device), self.cfg.rollout.temperature)
            loss, m = policy_loss(logp, old[r].to(self.device), adv[r].to(self.device), mask,
                                  clip_low=a.clip_low, clip_high=a.clip_high, agg=a.loss_agg)
            stats["pg_loss"].append(loss.item())
            if ref is not None:
                kl = kl_penalty(logp, ref[r].to(self.device), a.kl_estimator)
                kl_loss = aggregate_loss(kl, mask, a.loss_agg)
                loss = loss + a.kl_coef * kl_loss
                stats["kl"].append(masked_mean(kl.detach(), mask).item())
            with torch.no_grad():
                stats["entropy"].append(float(masked_mean(entropy_from_logits(logits.float()), mask)))
            for key in ("clipfrac", "approx_kl"):
                stats[key].append(float(m[key]))
            stats["loss"].append(loss.item())
            # global normalisation: DeepSpeed averages over ranks and accumulation steps
            scale = (local / max(float(total), 1.0)) * self.world_size * gas
            self.engine.backward(loss * scale)
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            stats["grad_norm"].append(float(norm))

    def _count(self, mask: torch.Tensor) -> float:
        """The loss's normaliser for these rows: tokens, sequences, or 1 for sums."""
        mode = self.cfg.algorithm.loss_agg
        if mode == "token-mean":
            return float(mask.sum())
        if mode == "token-sum":
            return 1.0
        return float((mask.sum(-1) > 0).sum())

    def _my_rows(self, n: int, step: int) -> torch.Tensor:
        """This rank's rows of the batch: a seeded split, the same on every rank."""
        g = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + step)
        perm = torch.randperm(n, generator=g)
        per = n // self.world_size
        return perm[self.rank * per : (self.rank + 1) * per].sort().values

    def _all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size > 1:
            x = x.to(self.device)
            dist.all_reduce(x)
        return x.cpu()

    def _reduce(self, stats: dict[str, list[float]]) -> dict[str, float]:
        keys = sorted(stats)
        local = torch.tensor([float(np.mean(stats[k])) for k in keys], dtype=torch.float64)
        mean = self._all_reduce_sum(local) / self.world_size
        return dict(zip(keys, mean.tolist()))

    # ---- weights out ------------------------------------------------------------------
    def _gathered(self):
        """Full parameters on every rank (ZeRO-3 shards them)."""
        if self.cfg.learner.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()))
        return nullcontext()

    def publish_weights(self, version: int) -> WeightHandle | None:
        """All ranks call this; rank 0 publishes once and returns the handle."""
        with self._gathered():
            if self.rank != 0:
                return None
            return self.transport.publish(self.engine.module.named_parameters(), version)

    def get_weights(self) -> dict[str, np.ndarray]:
        with self._gathered():
            return {n: p.detach().cpu().float().numpy().copy()
                    for n, p in self.engine.module.named_parameters()}

    def save_pretrained(self, path: str) -> str | None:
        """All ranks call this; rank 0 writes a folder ``from_pretrained`` loads."""
        with self._gathered():
            if self.rank != 0:
                return None
            self.engine.module.save_pretrained(path, safe_serialization=True)
        tok = load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.path,
                             self.cfg.model.trust_remote_code)
        tok.save_pretrained(path)
        return path
