"""The ``Env`` interface, loading ``env.path``, and calling environments with time limits."""

from __future__ import annotations

import asyncio
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

from rlalign_ray.errors import RlalignError, UserCodeError
from rlalign_ray.roles import import_object


class EnvError(RlalignError):
    """An environment raised, hung, or returned something that is not a ``StepResult``
    (the message names the environment class, the episode and the turn)."""


@dataclass
class StepResult:
    """What ``Env.step`` returns (Gym's 5-tuple, with text observations)."""

    observation: str | list[dict] = ""  # appended to the context (loss mask 0); "" for none
    reward: float = 0.0  # this turn's reward
    terminated: bool = False  # the episode reached an end state (an answer, a win, a loss)
    truncated: bool = False  # the environment cut the episode short (a step limit of its own)
    info: dict[str, Any] = field(default_factory=dict)  # anything to log or debug


class Env:
    """One episode of an environment. Subclass and override ``reset`` and ``step``.

    ``reset(item)`` gets the dataset row (``item.prompt``, ``item.columns``) and returns the
    first observation: the text the model sees (a string, or a list of chat messages that
    the tokenizer's chat template renders). ``step(action)`` gets the text the model
    generated this turn (special tokens removed) and returns a ``StepResult``. Both may be
    coroutines (``async def``). ``close`` is called once the episode ends.
    """

    def reset(self, item: Any) -> str | list[dict]:
        return item.prompt

    def step(self, action: str) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__}.step")

    def close(self) -> None:
        pass


def env_class(path: str) -> type:
    """The class named by ``env.path`` (``module:Class``), with a clear error."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise EnvError(f"env.path: write it as module:Class, got {path!r}")
    try:
        cls = import_object(path, "class")
    except UserCodeError as e:
        raise EnvError(f"env.path: cannot load {path!r}: {e}") from None
    if not callable(getattr(cls, "step", None)) or not callable(getattr(cls, "reset", None)):
        raise EnvError(f"env.path: {path!r} has no reset/step methods; subclass envs.Env")
    return cls


def call_all(calls: list[tuple[Any, tuple, str]], limit_s: float) -> list[Any]:
    """Run every ``(fn, args, what)`` concurrently, each in a daemon thread (a coroutine
    result is awaited there), all within ``limit_s`` seconds (0: no limit); returns their
    values in order. A call that raises or is still running at the deadline ends the batch
    with an ``EnvError`` naming its ``what`` (the environment and the episode); a hung
    call cannot be stopped, but nothing waits for it."""
    import time

    outs: list[dict[str, Any]] = [{} for _ in calls]

    def run(fn: Any, args: tuple, out: dict[str, Any]) -> None:
        try:
            value = fn(*args)
            if inspect.isawaitable(value):
                value = asyncio.run(_await(value))
            out["value"] = value
        except BaseException as e:  # re-raised, named, in the caller's thread
            out["error"] = e

    workers = []
    for (fn, args, what), out in zip(calls, outs):
        w = threading.Thread(target=run, args=(fn, args, out), name="env-call", daemon=True)
        w.start()
        workers.append(w)
    deadline = time.monotonic() + limit_s if limit_s else None
    for w, (_, _, what), out in zip(workers, calls, outs):
        w.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        if w.is_alive():
            raise EnvError(
                f"{what} did not return within {limit_s:g}s (env.timeout_s); the environment "
                "may hang. Make it faster or raise env.timeout_s"
            )
        if "error" in out:
            e = out["error"]
            raise EnvError(f"{what} raised {type(e).__name__}: {e}") from e
    return [out["value"] for out in outs]


async def _await(x: Any) -> Any:
    return await x
