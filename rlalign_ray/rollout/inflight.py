"""In-flight weight updates: a new version loaded between two decode steps of a generation.

With ``rollout.inflight_updates`` a generator actor has a second Ray concurrency group,
``weights`` (one thread), and ``WeightSync`` sends its ``load_weights`` calls there, so a
load reaches the actor while a chunk is being sampled. The two meet in a ``LoadGate``:

    actor's default thread        engine thread             weights thread (per bucket)
    v = gate.begin(expected)                                gate.load(apply):
    engine.run(generate) -------> each decode step:           while a generation runs,
                                    v = gate.between_steps()  hands ``apply`` over and
                                    step with version v       waits; else runs it itself
    loads = gate.end()

``between_steps`` runs the loads handed over (in the engine thread, between two steps)
and returns only once the version's last bucket is in, so a decode step never runs on
half-loaded weights, a load waits at most one decode step, and every token is sampled by
one complete version, which the backend records per token. The engine thread is the one
thread that ever runs the backend (``EngineThread``): thread settings are per thread, and
vLLM's CPU kernels check that theirs did not change. The gate is torch-free (the
simulated generators of ``bench`` use it too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rlalign_ray.errors import ActorFailure
from rlalign_ray.sync.plan import WEIGHTS_GROUP


class StaleWeightsError(ActorFailure):
    """A generator was asked to sample with weights other than the learner's latest."""


CONCURRENCY_GROUPS = {WEIGHTS_GROUP: 1}


class _Load:
    """One bucket's load handed to the sampler."""

    def __init__(self, apply: Callable[[], int]):
        self.apply, self.done, self.version, self.error = apply, False, -1, None

    def run(self) -> None:
        try:
            self.version = self.apply()
        except BaseException as e:  # raised again in the weights thread
            self.error = e
        self.done = True


class LoadGate:
    """Hands a generator's weights from its sampling loop to a load and back (see the
    module docstring). ``version`` is the complete version held."""

    def __init__(self, version: int = 0, timeout_s: float = 600.0):
        self._cond = threading.Condition()
        self.version = version
        self.timeout_s = timeout_s
        self._sampling = False  # a generation runs
        self._queued: list[_Load] = []  # loads handed to the generation
        self._waiting = 0  # loads not finished (a chunk starts after them)
        self._half = False  # a version is partly loaded: no decode step may run
        self._broken: str | None = None  # a load failed: the weights are unknown
        self.paused_loads = 0  # versions loaded while this generation was paused
        self.steps = 0  # decode steps this generation has begun

    # ---- the actor's default thread ------------------------------------------------------
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

    def end(self) -> int:
        """The generation is over (loads handed over after its last step run now); returns
        how many versions were loaded during it."""
        with self._cond:
            self._run_queued()
            self._sampling = False
            self._cond.notify_all()
            return self.paused_loads

    def sampling(self, expected: int | None = None) -> _Sampling:
        """``begin`` ... ``end`` as a context: ``with gate.sampling(v) as run: run.version``."""
        return _Sampling(self, expected)

    # ---- the engine thread ---------------------------------------------------------------
    def between_steps(self) -> int:
        """Run the loads handed over (waiting for the rest of a version that is half in);
        returns the version the next decode step samples with."""
        with self._cond:
            while self._queued or self._half:
                if not self._queued:
                    got = self._cond.wait_for(
                        lambda: self._queued or self._broken is not None, self.timeout_s
                    )
                    if not got:
                        self._broken = "the rest of a version did not arrive"
                    self._raise_if_broken()
                    continue
                before = self.version
                self._run_queued()
                self.paused_loads += self.version != before and not self._half
            self._raise_if_broken()
            self.steps += 1
            self._cond.notify_all()
            return self.version

    def _run_queued(self) -> None:
        while self._queued:
            load = self._queued.pop(0)
            load.run()
            self._applied(load)

    def _applied(self, load: _Load) -> None:
        if load.error is not None:
            self._broken = f"{type(load.error).__name__}: {load.error}"
        elif load.version >= 0:
            self._half, self.version = False, load.version
        else:
            self._half = True
        self._cond.notify_all()

    # ---- the weights thread --------------------------------------------------------------
    def load(self, apply: Callable[[], int]) -> int:
        """Load one bucket: ``apply`` returns the version then held (-1 while a version is
        half in). During a generation the engine thread runs it between two decode steps;
        otherwise it runs here, the next generation waiting for it."""
        load = _Load(apply)
        with self._cond:
            self._waiting += 1
            try:
                if self._sampling:
                    self._queued.append(load)
                    self._cond.notify_all()
                    if not self._cond.wait_for(lambda: load.done, self.timeout_s):
                        raise ActorFailure(
                            f"a weight load waited {self.timeout_s:g}s (sync.timeout_s) for "
                            "the generation in progress to reach a decode step boundary"
                        )
                else:
                    load.run()
                    self._applied(load)
            finally:
                self._waiting -= 1
                self._cond.notify_all()
        if load.error is not None:
            raise load.error
        return load.version

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


class EngineThread:
    """The one thread that runs a generator's backend with in-flight updates: built in it,
    sampling in it, loads in it (see the module docstring). ``run`` from that thread calls
    directly."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rlalign-engine")
        self._ident = self._pool.submit(threading.get_ident).result()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.get_ident() == self._ident:
            return fn(*args)
        return self._pool.submit(fn, *args).result()


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
