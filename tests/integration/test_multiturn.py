"""Multi-turn training through the whole loop (real local Ray, tiny model): environments
inside the generators, and an environment actor pool."""

from __future__ import annotations

import json

import pytest
from conftest import small_config

from rlalign_ray.config import config_from_dict
from rlalign_ray.trainers import Trainer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("num_env_actors", [0, pytest.param(2, marks=pytest.mark.full)])
def test_two_multiturn_steps(ray_local, tiny_model, tmp_path, num_env_actors):
    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path),
            env={
                "path": "rlalign_ray.envs.builtin:CalculatorEnv",
                "kwargs": {"max_calls": 2},
                "max_turns": 3,
                "stop": [">"],
                "reward": "last",
                "num_actors": num_env_actors,
            },
            reward={"rewards": [], "num_actors": 1},
            trainer={"steps": 2, "eval_every": 0},
        )
    )
    last = Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/reward/env" in rows[0] and "train/reward/env" in last
    assert last["weights/version"] == 2


def test_pool_api_runs_an_environment_pool(ray_local, tiny_model, tmp_path):
    """A user's loop: a generator pool stepping its episodes in an environment pool."""
    import ray

    from rlalign_ray.data.batch import PromptItem
    from rlalign_ray.pools import EnvPool, GeneratorPool, launch

    cfg = config_from_dict(
        small_config(
            tiny_model,
            str(tmp_path),
            env={"path": "helpers.envs:EchoEnv", "max_turns": 2, "num_actors": 2},
            rollout={"num_actors": 1, "max_new_tokens": 3, "ignore_eos": True},
        )
    )
    gen, envs = GeneratorPool(cfg), EnvPool(cfg)
    with launch(cfg.run, gen, envs):
        envs.attach(gen)
        items = [PromptItem(i, f"{i}+1=") for i in range(3)]
        (ref,) = gen.generate(items, n=2)
        batch = ray.get(ref, timeout=120)
    assert batch.columns["env_reward"] == [0.5] * 6  # 2 turns x 0.25 (env.reward: sum)
    assert batch.truncated.all() and (batch.response_mask.sum(1) == 6).all()


def test_environment_actor_errors_name_the_environment_and_episode(ray_local, tiny_model, tmp_path):
    from rlalign_ray.data.batch import PromptItem
    from rlalign_ray.envs import EnvError
    from rlalign_ray.envs.host import EnvHost
    from rlalign_ray.rollout.generator import Generator

    cfg = config_from_dict(
        small_config(tiny_model, str(tmp_path), env={"path": "helpers.envs:RaisesEnv"})
    )
    host = ray_local.remote(EnvHost).options(num_cpus=0).remote(cfg.env, 0)
    gen = Generator(cfg.model, cfg.rollout, 0, env=cfg.env)
    gen.set_env_actors([host])
    with pytest.raises(
        EnvError,
        match=r"helpers.envs:RaisesEnv \(environment actor 0\) step of episode \(prompt 3, "
        r"sample 0\), turn 1 raised RuntimeError: the simulator crashed",
    ):
        gen.generate([PromptItem(3, "1+2=")], n_samples=1)
    ray_local.kill(host)
