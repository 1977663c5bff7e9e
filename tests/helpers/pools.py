"""Actors and rewards for the named-pools tests (imported by the workers by module path).

The rewards count what they score: every call appends its number of completions to
``SCORED/<pool>.<pid>`` once it is done (a call killed midway writes nothing), so a test
can check that each reward pool scored every landed sample once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from helpers.rewards import digit_fraction
from helpers.stalls import stall_if_armed
from rlalign_ray.rollout.generator import Generator

SCORED = Path(tempfile.gettempdir()) / "rlalign-test-named-pools"


def _count(pool: str, n: int) -> None:
    SCORED.mkdir(exist_ok=True)
    with open(SCORED / f"{pool}.{os.getpid()}", "a") as f:
        f.write(f"{n}\n")


def scored(pool: str) -> int:
    """Samples the reward pool ``pool`` scored so far (every actor, replaced ones too)."""
    return sum(int(x) for p in SCORED.glob(f"{pool}.*") for x in p.read_text().split())


def brevity(prompts, completions, **columns):
    """The judge: shorter completions score higher."""
    return [1.0 / (1.0 + len(c)) for c in completions]


def counted_digits(prompts, completions, **columns):
    values = digit_fraction(prompts, completions)
    _count("reward", len(completions))
    return values


def stalling_judge(prompts, completions, **columns):
    stall_if_armed("judge")
    values = brevity(prompts, completions)
    _count("judge", len(completions))
    return values


class StallingGenB(Generator):
    """The second generator pool's class: stalls in the first chunk it samples with weights
    of version >= 1."""

    def generate_chunk(self, items, n_samples, greedy=False, expected_version=None, seed=None):
        if self.version >= 1 and not greedy:
            stall_if_armed("gen_b")
        return super().generate_chunk(items, n_samples, greedy, expected_version, seed)
