"""A dataset row as the driver hands it to generators: plain data, no torch, so that an
actor which only receives prompts (a simulated generator in ``rlalign_ray.bench``) need not
import torch to unpickle them. ``data/batch.py`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptItem:
    """One dataset row: the prompt and the extra columns a reward may use."""

    index: int  # position in the dataset; samples of one prompt share it as group id
    prompt: Any  # a string, or a list of chat messages
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where it was read: "file:line" (JSONL) or "path row N" (for errors)
