"""Resumable checkpoints and run folders.

A checkpoint is a folder ``<output_dir>/checkpoints/step_N``:

    trainer_state.json   step, weight version, prompt sampler, KL controller, totals
    driver_rng.pt        the driver's torch, Python and NumPy random states (tensors and
                         plain values: read with ``torch.load(weights_only=True)``)
    generators_rng.pt    every generator's random state (rank order)
    rollout_buffer/      pipelined runs: the chunks sampled for steps after N, with their
                         rewards and reference log-probs (``trainers/buffer.py``)
    learner/             DeepSpeed's checkpoint of every learner rank (optimizer, ZeRO shards)
    critic/              the same for the critic ranks (PPO)
    *.safetensors ...    the policy as a Hugging Face folder (``from_pretrained`` loads it)

In a local ``output_dir`` it is written into ``checkpoints/.tmp-step_N`` and renamed to
``step_N`` once complete (atomic on one filesystem), so a folder named ``step_N`` is always
complete and a run killed while saving leaves a ``.tmp-`` folder, removed at the next start.
In a URI (``storage.py``; object stores have no atomic rename) every writer uploads into
``step_N`` itself and the driver writes ``trainer_state.json`` last: only a folder holding
it counts as complete, and one without it is removed at the next start. Then the ``latest``
marker names the new checkpoint, and only the last ``trainer.keep_checkpoints`` are kept.

Runs resume exactly, synchronous or pipelined: every later step logs the same metrics as
the run that never stopped. A pipelined run's checkpoint waits for the generation in flight
for later steps and stores it (the rollout buffer), so nothing is sampled twice or lost.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlalign_ray.errors import ConfigError
from rlalign_ray.storage import Storage, basename, is_remote, join, local_path

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)")


@dataclass
class TrainerState:
    """What the driver needs, besides the actors' own state, to continue after ``step``."""

    step: int
    version: int  # the weight version the learner published
    sampler: dict[str, int]  # PromptSampler.state_dict() before step + 1 was drawn
    kl_coef: float
    totals: dict[str, int] = field(default_factory=dict)  # Rollouts.totals
    staleness: dict[str, int] = field(default_factory=dict)  # max_staleness: auto's state

    def write(self, folder: str | Path, storage: Storage | None = None) -> None:
        """Written last: its presence marks the checkpoint complete."""
        text = json.dumps(asdict(self), indent=2) + "\n"
        (storage or LOCAL).write_text(join(str(folder), STATE_FILE), text)

    @classmethod
    def read(cls, folder: str | Path, storage: Storage | None = None) -> TrainerState:
        return cls(**json.loads((storage or LOCAL).read_text(join(str(folder), STATE_FILE))))


# ---- random states --------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random states: torch (CPU and CUDA), Python's ``random`` and NumPy's,
    as tensors, ints, floats and strings only, so ``load(path)`` reads them back with
    ``torch.load(weights_only=True)`` (no pickled objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": list(random.getstate()[1]),  # (version 3, 625 ints, None)
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))


def load(path: str | Path) -> Any:
    """A ``.pt`` file of tensors and plain values (random states), read with
    ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            [
                f"{path}: not loadable with torch.load(weights_only=True) ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); checkpoints hold only tensors "
                "and plain values -- one written by an older version must be written again"
            ]
        ) from None


def safe_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed read ``engine``'s checkpoints with ``torch.load(weights_only=True)``
    (its ``TorchCheckpointEngine`` unpickles arbitrary objects). DeepSpeed's own plain
    classes its files hold are allow-listed (``SAFE_GLOBALS``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:  # another engine (e.g. Nebula): leave it
        return

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = WeightsOnly.__new__(WeightsOnly)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


def safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's checkpoint files hold (enums and plain records)."""
    found: list[Any] = []
    for module, name in SAFE_GLOBALS:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return found


SAFE_GLOBALS = [
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
]


# ---- folders ----------------------------------------------------------------------------
LOCAL = Storage()  # plain local paths need no options


def checkpoints_dir(output_dir: str | Path) -> str:
    return join(str(output_dir), "checkpoints")


def begin(output_dir: str, step: int, storage: Storage = LOCAL) -> str:
    """The empty folder to write step N's checkpoint into: ``checkpoints/.tmp-step_N`` in a
    local ``output_dir`` (renamed by ``commit``); in a URI ``checkpoints/step_N`` itself,
    rid of what an interrupted save left there (``trainer_state.json``, written last,
    marks it complete: object stores have no atomic rename)."""
    if is_remote(output_dir):
        folder = join(checkpoints_dir(output_dir), f"step_{step}")
        storage.remove(folder)
        return folder
    tmp = Path(checkpoints_dir(output_dir)) / f".tmp-step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return str(tmp)


def commit(folder: str, step: int, keep: int, storage: Storage = LOCAL) -> str:
    """Make the written ``folder`` checkpoint ``step_N`` (a local one is renamed), point
    ``latest`` at it, and keep only the last ``keep`` checkpoints (0: all)."""
    root = folder.rstrip("/").rsplit("/", 1)[0] if is_remote(folder) else str(Path(folder).parent)
    final = join(root, f"step_{step}")
    if not is_remote(folder):
        if os.path.exists(final):  # a run resumed from an earlier step writes this step again
            shutil.rmtree(final)
        os.rename(folder, final)
    storage.write_text(join(root, LATEST), f"step_{step}\n")
    if keep:
        for old in complete(root, storage)[:-keep]:
            storage.remove(old)
    return final


def complete(root: str | Path, storage: Storage = LOCAL) -> list[str]:
    """The complete checkpoints under ``root``, oldest first."""
    found = [
        (int(m.group(1)), join(str(root), name))
        for name in storage.listdir(str(root))
        if (m := _STEP.match(name))
    ]
    return [p for _, p in sorted(found) if storage.is_file(join(p, STATE_FILE))]


def latest(root: str | Path, storage: Storage = LOCAL) -> str | None:
    """The checkpoint ``latest`` names (or, without the marker, the newest complete one)."""
    root = str(root)
    marker = join(root, LATEST)
    if storage.is_file(marker):
        named = join(root, storage.read_text(marker).strip())
        if storage.is_file(join(named, STATE_FILE)):
            return named
    found = complete(root, storage)
    return found[-1] if found else None


def prepare_run(output_dir: str, resume: str, storage: Storage = LOCAL) -> str | None:
    """Check ``output_dir`` against ``trainer.resume`` and return the checkpoint to resume
    from (None: a new run). What an interrupted save left goes: local ``.tmp-`` folders,
    and in a URI the ``step_N`` folders without ``trainer_state.json``."""
    if resume == "none":
        if storage.exists(output_dir) and (
            not _is_dir(output_dir, storage) or storage.listdir(output_dir)
        ):
            raise ConfigError(
                [
                    f"trainer.output_dir: {output_dir!r} already holds a run; resume it with "
                    "trainer.resume=auto or pick another trainer.output_dir"
                ]
            )
        return None
    if resume == "auto":
        ckpt = latest(checkpoints_dir(output_dir), storage)
    else:
        path = resume if is_remote(resume) else local_path(resume)
        ckpt = path if storage.is_file(join(path, STATE_FILE)) else None
        ckpt = ckpt or latest(checkpoints_dir(path), storage)
        if ckpt is None:
            raise ConfigError(
                [f"trainer.resume: {resume!r} holds no complete checkpoint ({STATE_FILE})"]
            )
    _clean(checkpoints_dir(output_dir), storage)
    if ckpt is None:
        log.info("trainer.resume=auto: no checkpoint in %s; starting a new run", output_dir)
    else:
        log.info("resuming from %s", ckpt)
    return ckpt


def _is_dir(path: str, storage: Storage) -> bool:
    return not storage.is_file(path) if is_remote(path) else os.path.isdir(path)


def _clean(root: str, storage: Storage) -> None:
    """Remove what an interrupted save left under the checkpoints folder ``root``."""
    for name in storage.listdir(root):
        path = join(root, name)
        if is_remote(root):
            if _STEP.match(name) and not storage.is_file(join(path, STATE_FILE)):
                storage.remove(path)
        elif name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)


def other_ranks_file(rel: str, rank: int) -> bool:
    """Whether the DeepSpeed checkpoint file ``rel`` is another data-parallel rank's (its
    ZeRO partition ``*zero_pp_rank_<r>_*`` or our ``rng_rank<r>.pt``): a rank loading a
    checkpoint from a URI downloads only its own and the shared ones."""
    m = _RANK_FILE.search(basename(rel))
    return m is not None and int(m.group(1)) != rank
