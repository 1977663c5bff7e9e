"""Deprecated: ``rlalign_ray.loggers`` was renamed ``rlalign_ray.log_backends``. This alias
warns on import (``DeprecationWarning``) and goes in the next release."""

from rlalign_ray import log_backends as _moved
from rlalign_ray.errors import moved_module

moved_module(__name__, _moved)
