"""Actors that stall, once, at a chosen point and say their PID: a test kills them there.

A test arms a stall by creating ``CLAIMS/<name>.arm``; the first actor that reaches the
point renames it to ``<name>.<pid>`` (atomic: one actor wins) and sleeps, so the test
knows the process to SIGKILL while it is in the middle of that call. Imported by the
workers by module path.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from helpers.rewards import digit_fraction
from rlalign_ray.learner.learner import Learner
from rlalign_ray.learner.reference import Reference
from rlalign_ray.rollout.generator import Generator

CLAIMS = Path(tempfile.gettempdir()) / "rlalign-test-dead-actors"


def stall_if_armed(name: str) -> None:
    try:
        os.rename(CLAIMS / f"{name}.arm", CLAIMS / f"{name}.{os.getpid()}")
    except OSError:
        return  # not armed, or another actor took it
    time.sleep(300)  # killed here


class StallingGenerator(Generator):
    """Stalls in the first chunk it samples with weights of version >= 1 (step 2 of a
    synchronous run)."""

    def generate_chunk(self, items, n_samples, greedy=False, expected_version=None, seed=None):
        if self.version >= 1 and not greedy:
            stall_if_armed("generator")
        return super().generate_chunk(items, n_samples, greedy, expected_version, seed)


class StallingReference(Reference):
    def logprobs(self, batch):
        stall_if_armed("reference")
        return super().logprobs(batch)


class StallingLearner(Learner):
    """Stalls in step 3's update."""

    def train_step(self, part, advantages, kl_coef, step):
        if step == 3:
            stall_if_armed("learner")
        return super().train_step(part, advantages, kl_coef, step)


def stalling_reward(prompts, completions, **columns):
    stall_if_armed("reward")
    return digit_fraction(prompts, completions)


SLEEP_LOG = Path(tempfile.gettempdir()) / "rlalign-test-sleep-log"


class SleepLogGenerator(Generator):
    """A generator that plays ``rollout.enable_sleep_mode`` on the HF backend: it writes
    every sleep, wake and weight load to ``SLEEP_LOG/<pid>`` (the test reads them), with
    whether it was asleep then."""

    asleep = False

    def _log(self, event: str) -> None:
        SLEEP_LOG.mkdir(exist_ok=True)
        with open(SLEEP_LOG / str(os.getpid()), "a") as f:
            f.write(f"{event} {'asleep' if self.asleep else 'awake'}\n")

    def sleep(self) -> None:
        self._log("sleep")
        self.asleep = True

    def wake_up(self) -> None:
        self._log("wake")
        self.asleep = False

    def load_weights(self, handle):
        self._log("load")
        return super().load_weights(handle)
