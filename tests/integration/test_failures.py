"""Bad input ends the run with a clear error: no hang, no bare traceback."""

from __future__ import annotations

import time

import pytest
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.errors import ActorFailure, PlacementError, RewardError
from rlalign_ray.runtime.cluster import LOOPBACK
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


def _run(tiny_model, tmp_path, **sections):
    """One generator, one reward actor, no reference: the fewest actors that fail."""
    sections.setdefault("algorithm", {"kl_coef": 0.0})
    sections.setdefault("rollout", {"num_actors": 1})
    sections.setdefault("reward", {})
    sections["reward"].setdefault("num_actors", 1)
    cfg = small_config(tiny_model, str(tmp_path / "run"), **sections)
    return Trainer(config_from_dict(cfg)).fit()


def test_unsatisfiable_resources_fail_fast_with_what_was_asked(ray_local, tiny_model, tmp_path):
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        _run(
            tiny_model,
            tmp_path,
            rollout={"resources": {"num_gpus": 1}},
            run={"placement_timeout_s": 3},
        )
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "generator" in msg and "GPU" in msg and "The cluster has" in msg and "CPU=8" in msg
    import ray

    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    )


@pytest.mark.full  # the bad-input table's reward_raises row runs it through the CLI
def test_reward_function_that_raises_names_the_function(ray_local, tiny_model, tmp_path):
    with pytest.raises(RewardError) as err:
        _run(
            tiny_model,
            tmp_path,
            reward={"rewards": [{"type": "function", "path": "helpers.rewards:raises"}]},
        )
    msg = str(err.value)
    assert "helpers.rewards:raises" in msg and "ValueError: bad reward input" in msg


def test_reward_with_wrong_length(ray_local, tiny_model, tmp_path):
    with pytest.raises(RewardError, match="returned 1 values for"):
        _run(
            tiny_model,
            tmp_path,
            reward={"rewards": [{"type": "function", "path": "helpers.rewards:wrong_length"}]},
        )


def test_reward_module_that_does_not_import(ray_local, tiny_model, tmp_path):
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        _run(
            tiny_model,
            tmp_path,
            reward={"rewards": [{"type": "function", "path": "no_such_module:fn"}]},
        )


def test_dead_actor_ends_the_run_naming_the_role(ray_local, tiny_model, tmp_path):
    """A reward actor that dies on every batch is replaced run.max_actor_restarts times,
    then the run stops naming the role, the actors and their node."""
    with pytest.raises(ActorFailure, match="reward pool.*actor died") as err:
        _run(
            tiny_model,
            tmp_path,
            reward={"rewards": [{"type": "function", "path": "helpers.rewards:dies"}]},
            run={"max_actor_restarts": 1},
        )
    msg = str(err.value)
    assert "after 1 restarts of this role (run.max_actor_restarts=1)" in msg, msg
    assert f"Actors that died: reward 0 on {LOOPBACK}, reward 0 on {LOOPBACK}" in msg, msg
    assert "Roles that lost actors: reward (1 of 1 actors)" in msg, msg
