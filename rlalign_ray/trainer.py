"""``from rlalign_ray.trainer import Trainer`` (the loop lives in ``rlalign_ray.trainers``)."""

from rlalign_ray.trainers.trainer import Trainer, rollout_metrics

__all__ = ["Trainer", "rollout_metrics"]
