"""Training loops built on the pool API: ``Trainer`` (synchronous, or pipelined with
``trainer.max_staleness``)."""

from rlalign_ray.trainers.trainer import Trainer

__all__ = ["Trainer"]
