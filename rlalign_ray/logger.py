"""Deprecated: ``rlalign_ray.logger`` was renamed ``rlalign_ray.run_log``. This alias warns on
import (``DeprecationWarning``) and goes in the next release."""

from rlalign_ray import run_log as _moved
from rlalign_ray.errors import moved_module

moved_module(__name__, _moved)
