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

It is written into ``checkpoints/.tmp-step_N`` and renamed to ``step_N`` once complete
(atomic on one filesystem), then the ``latest`` marker names it; only the last
``trainer.keep_checkpoints`` are kept. A folder named ``step_N`` is always complete: a run
killed while saving leaves a ``.tmp-`` folder, removed at the next start. Learner ranks on
several nodes need ``output_dir`` on a filesystem they all share.

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

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """What the driver needs, besides the actors' own state, to continue after ``step``."""

    step: int
    version: int  # the weight version the learner published
    sampler: dict[str, int]  # PromptSampler.state_dict() before step + 1 was drawn
    kl_coef: float
    totals: dict[str, int] = field(default_factory=dict)  # Rollouts.totals
    staleness: dict[str, int] = field(default_factory=dict)  # max_staleness: auto's state

    def write(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


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
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def staging(output_dir: str | Path, step: int) -> Path:
    """An empty ``checkpoints/.tmp-step_N`` to write step N's checkpoint into."""
    tmp = checkpoints_dir(output_dir) / f".tmp-step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int) -> Path:
    """Rename the finished ``tmp`` to ``step_N``, point ``latest`` at it, and keep only the
    last ``keep`` checkpoints (0: all)."""
    root = tmp.parent
    final = root / f"step_{step}"
    if final.exists():  # a run resumed from an earlier step writes this step again
        shutil.rmtree(final)
    os.rename(tmp, final)
    marker = root / f".{LATEST}.tmp"
    marker.write_text(final.name + "\n")
    os.replace(marker, root / LATEST)
    if keep:
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names (or, without the marker, the newest complete one)."""
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    found = complete(root)
    return found[-1] if found else None


def prepare_run(output_dir: str, resume: str) -> Path | None:
    """Check ``output_dir`` against ``trainer.resume`` and return the checkpoint to resume
    from (None: a new run). Leftover ``.tmp-`` folders of an interrupted save go."""
    out = Path(output_dir)
    if resume == "none":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(
                [
                    f"trainer.output_dir: {output_dir!r} already holds a run; resume it with "
                    "trainer.resume=auto or pick another trainer.output_dir"
                ]
            )
        return None
    if resume == "auto":
        ckpt = latest(checkpoints_dir(out))
    else:
        path = Path(resume)
        ckpt = path if (path / STATE_FILE).is_file() else latest(checkpoints_dir(path))
        if ckpt is None:
            raise ConfigError(
                [f"trainer.resume: {resume!r} holds no complete checkpoint ({STATE_FILE})"]
            )
    root = checkpoints_dir(out)
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if ckpt is None:
        log.info("trainer.resume=auto: no checkpoint in %s; starting a new run", output_dir)
    else:
        log.info("resuming from %s", ckpt)
    return ckpt
