"""A generator that makes an in-flight load certain: from its second training chunk on, it
holds each chunk at its second decode step until a weight load is handed over (at most
``HOLD_S``), so a pipelined test sees loads mid-chunk whatever the machine's timing.
Imported by the workers by module path (``rollout.actor_class``)."""

from __future__ import annotations

from rlalign_ray.rollout.generator import Generator
from rlalign_ray.rollout.inflight import LoadGate

HOLD_S = 120.0
LAST_VERSION = 3  # test_inflight.py trains 3 steps: no load follows version 3


class HoldingGate(LoadGate):
    hold = False  # set per chunk by the generator

    def between_steps(self) -> int:
        # a chunk sampled with the run's last version (the one the last step publishes: a
        # chunk the pipeline requested beyond the last step) would wait for no load
        if self.hold and self.steps == 1 and self.version < LAST_VERSION:
            with self._cond:  # the load itself runs in the base class, in this thread
                self._cond.wait_for(lambda: self._queued or self._half, HOLD_S)
        return super().between_steps()


class HoldingGenerator(Generator):
    """With a static split (one chunk per generator and step) and trainer.max_staleness=1,
    its chunk of step s >= 2 starts before the learner publishes version s - 1, which it
    then waits for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = HoldingGate()
        self.chunks = 0

    def generate_chunk(self, items, n_samples, greedy=False, expected_version=None, seed=None):
        if not greedy:
            self.chunks += 1
            self.gate.hold = self.chunks >= 2
        return super().generate_chunk(items, n_samples, greedy, expected_version, seed)
