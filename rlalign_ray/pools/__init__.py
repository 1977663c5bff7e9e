"""The public pool API: pools of each role (several of a kind under names), each owning its actors and returning refs or
``Future``s. Trainers (``rlalign_ray.trainers``) and users' own loops are built on it.

    from rlalign_ray.pools import (GeneratorPool, RewardPool, ReferencePool, LearnerGroup,
                                   CriticGroup, WeightSync, Experience, launch)

See ``launch/examples/custom_loop.py`` for a complete loop.
"""

from rlalign_ray.pools.base import ActorPool, Future, launch, start, stop
from rlalign_ray.pools.chunks import Chunk
from rlalign_ray.pools.env import EnvPool
from rlalign_ray.pools.generator import GeneratorPool
from rlalign_ray.pools.generators import GeneratorPools
from rlalign_ray.pools.learner import CriticGroup, Experience, LearnerGroup
from rlalign_ray.pools.reference import ReferencePool
from rlalign_ray.pools.reward import RewardPool
from rlalign_ray.runtime.placement import get
from rlalign_ray.sync.targets import WeightTargets
from rlalign_ray.sync.weight_sync import WeightSync

__all__ = [
    "ActorPool",
    "Chunk",
    "CriticGroup",
    "EnvPool",
    "Experience",
    "Future",
    "GeneratorPool",
    "GeneratorPools",
    "LearnerGroup",
    "ReferencePool",
    "RewardPool",
    "WeightSync",
    "WeightTargets",
    "get",
    "launch",
    "start",
    "stop",
]
