"""In-flight weight updates: a new version loaded between two decode steps of a generation.

With ``rollout.inflight_updates`` a generator actor has a second Ray concurrency group,
``weights`` (one thread), and ``WeightSync`` sends its ``load_weights`` calls there, so a
load reaches the actor while a chunk is being sampled in the default group's thread. The
two threads meet in a ``LoadGate``:

    sampling thread                       weights thread (one call per bucket)
    v = gate.begin(expected)              gate.load(apply)
    for each decode step:                   waits until no decode step runs: the sampler
        v = gate.between_steps()            is parked between two steps, or not sampling;
        forward + sample with version v     applies the bucket; the sampler stays parked
    loads = gate.end()                      until the version's last bucket is in

So a decode step never runs on half-loaded weights, a load waits at most one decode step,
and every token is sampled by one complete version, which the backend records per token.
The gate is torch-free (the simulated generators of ``bench`` use it too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rlalign_ray.errors import ActorFailure
from rlalign_ray.sync.plan import WEIGHTS_GROUP


class StaleWeightsError(ActorFailure):
    """A generator was asked to sample with weights other than the learner's latest."""


CONCURRENCY_GROUPS = {WEIGHTS_GROUP: 1}


class LoadGate:
    """Hands a generator's weights from its sampling loop to a load and back (see the
    module docstring). ``version`` is the complete version held (-1: none yet)."""

    def __init__(self, version: int = 0, timeout_s: float = 600.0):
        self._cond = threading.Condition()
        self.version = version
        self.timeout_s = timeout_s
        self._sampling = False  # a generation runs in the sampling thread
        self._parked = False  # ... and waits between two decode steps
        self._waiting = 0  # loads waiting for the generation to park
        self._half = False  # a version is partly loaded: no decode step may run
        self._broken: str | None = None  # a load failed: the weights are unknown
        self.paused_loads = 0  # versions loaded while this generation was parked
        self.steps = 0  # decode steps this generation has begun

    # ---- the sampling thread -------------------------------------------------------------
    def begin(self, expected: int | None = None) -> int:
        """Start a generation once a complete version >= ``expected`` is held (a load sent
        before the chunk may still be on its way: the two calls run in different threads);
        returns that version. A newer one than expected is fine: it is recorded."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: (
                    self._broken is not None
                    or not (self._half or self._waiting)
                    and (expected is None or self.version >= expected)
                ),
                self.timeout_s,
            )
            self._raise_if_broken()
            if not ready:
                raise StaleWeightsError(
                    f"generator holds weight version {self.version}, the driver expects "
                    f"{expected}, and no load brought it within {self.timeout_s:g}s "
                    "(sync.timeout_s); refusing to sample with stale weights"
                )
            self._sampling, self.paused_loads, self.steps = True, 0, 0
            self._cond.notify_all()
            return self.version

    def between_steps(self) -> int:
        """Let loads that wait in (parked until the version is complete); returns the
        version the next decode step samples with."""
        with self._cond:
            if self._waiting or self._half:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait_for(
                    lambda: self._broken is not None or not (self._waiting or self._half)
                )
                self._parked = False
            self._raise_if_broken()
            self.steps += 1
            self._cond.notify_all()
            return self.version

    def end(self) -> int:
        """The generation is over; returns how many versions were loaded during it."""
        with self._cond:
            self._sampling = False
            self._cond.notify_all()
            return self.paused_loads

    def sampling(self, expected: int | None = None) -> _Sampling:
        """``begin`` ... ``end`` as a context: ``with gate.sampling(v) as run: run.version``."""
        return _Sampling(self, expected)

    # ---- the weights thread --------------------------------------------------------------
    def load(self, apply: Callable[[], int]) -> int:
        """Run ``apply`` (loads one bucket, returns the version held: -1 while a version is
        half in) while no decode step runs; returns what it returned."""
        with self._cond:
            self._waiting += 1
            try:
                idle = self._cond.wait_for(
                    lambda: not self._sampling or self._parked, self.timeout_s
                )
                if not idle:
                    raise ActorFailure(
                        f"a weight load waited {self.timeout_s:g}s (sync.timeout_s) for the "
                        "generation in progress to reach a decode step boundary"
                    )
                try:
                    version = apply()
                except BaseException as e:
                    self._broken = f"{type(e).__name__}: {e}"
                    raise
                self._half = version < 0
                if version >= 0:
                    self.paused_loads += self._sampling
                    self.version = version
            finally:
                self._waiting -= 1
                self._cond.notify_all()
            return version

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise ActorFailure(
                f"a weight load failed mid-generation ({self._broken}); this generator's "
                "weights are incomplete until the next sync"
            )


class _Sampling:
    def __init__(self, gate: LoadGate, expected: int | None):
        self.gate, self.expected = gate, expected
        self.version = -1  # the version the generation started with
        self.loads = 0  # versions loaded during it (known on exit)

    def __enter__(self) -> _Sampling:
        self.version = self.gate.begin(self.expected)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loads = self.gate.end()


def version_summary(token_versions: Any, mask: Any) -> dict[str, list[float]]:
    """Per row of (B, T) token versions (``mask`` > 0 on the tokens the model sampled):
    the oldest version, the sum of the versions and the number of sampled tokens. What
    the driver reads (a chunk's info) for ``rollout/version_lag_mean``: the lag of the
    rows it trains is ``learner version - sum / tokens`` over them, per token."""
    sampled = mask > 0
    tokens = sampled.sum(dim=1).tolist()
    oldest = token_versions.masked_fill(~sampled, 1 << 40).min(dim=1).values.tolist()
    return {
        "oldest": [v if n else -1 for v, n in zip(oldest, tokens)],  # -1: nothing sampled
        "sum": (token_versions * sampled).sum(dim=1).tolist(),
        "tokens": tokens,
    }
