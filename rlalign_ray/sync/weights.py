"""Deprecated: ``rlalign_ray.sync.weights`` was renamed ``rlalign_ray.sync.transports``. This
alias warns on import (``DeprecationWarning``) and goes in the next release."""

from rlalign_ray.errors import moved_module
from rlalign_ray.sync import transports as _moved

moved_module(__name__, _moved)
