"""Deprecated: ``rlalign_ray.runtime.pools`` was renamed ``rlalign_ray.runtime.placement``.
This alias warns on import (``DeprecationWarning``) and goes in the next release."""

from rlalign_ray.errors import moved_module
from rlalign_ray.runtime import placement as _moved

moved_module(__name__, _moved)
