"""The errors a user sees. Each carries a message that names what failed and how to fix it;
and the warning a moved module's old name gives (``moved_module``)."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType


class RlalignError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ConfigError(RlalignError):
    """One or more config keys are wrong; every problem is listed."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class DataError(RlalignError):
    """A dataset file is missing or has a malformed line (the message names file:line)."""


class RewardError(RlalignError):
    """A reward function or model failed on a batch."""


class UserCodeError(RlalignError):
    """A ``module:name`` the config names (a reward function, an environment, an actor
    class) cannot be imported; the message says where it was looked for."""


class NonFiniteError(RlalignError):
    """Training diverged: too many optimizer steps in a row had a non-finite loss or
    gradient norm (``learner.max_skipped_steps``)."""


class ClusterError(RlalignError):
    """The Ray cluster to attach to cannot be reached."""


class StorageError(RlalignError):
    """``trainer.output_dir`` cannot be used by every process that writes there (a local
    folder the nodes do not share, a URI a node cannot write)."""


class PlacementError(RlalignError):
    """The cluster cannot place the requested actors."""


class ActorFailure(RlalignError):
    """An actor of a role died or failed mid-run."""


class WeightSyncError(ActorFailure):
    """A weight sync failed or timed out (the message names the transport and the actor)."""


def moved_module(old: str, module: ModuleType, new: str = "") -> None:
    """In the module ``old``, kept as an alias for one release after it moved: warn
    (``DeprecationWarning``, pointed at the code that imported it) and make ``old`` the
    ``module`` it moved to, so every name imports either way. ``new``: the name to tell
    users (default: the module's)."""
    warnings.warn(  # stacklevel 3: who imported the alias (warn skips importlib's frames)
        f"{old} is deprecated: import {new or module.__name__} instead (the old name goes in "
        "the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = module
