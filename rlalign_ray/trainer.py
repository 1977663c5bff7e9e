"""Deprecated: ``rlalign_ray.trainer`` (``Trainer``, ``rollout_metrics``): the loop lives in
``rlalign_ray.trainers``. This alias warns on import (``DeprecationWarning``) and goes in
the next release."""

from rlalign_ray.errors import moved_module
from rlalign_ray.trainers import trainer as _moved

moved_module(__name__, _moved, "rlalign_ray.trainers")
