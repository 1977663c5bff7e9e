"""Environments for multi-turn rollouts, in the Gym style.

    class MyEnv(Env):
        def reset(self, item: PromptItem) -> str | list[dict]:    # the first observation
            ...
        def step(self, action: str) -> StepResult:                # the model's action text
            return StepResult(observation, reward, terminated, truncated, info)

One instance per episode (a prompt's sample), built as ``cls(**env.kwargs)``. ``reset``
and ``step`` may be ``async def``. A generator runs many episodes at once: each turn, the
actions of every live episode are generated in one batch, then the episodes' ``step`` calls
run concurrently (threads), each bounded by ``env.timeout_s``.

Built-ins: ``rlalign_ray.envs.builtin:CalculatorEnv`` (a tool-calling environment) and
``rlalign_ray.envs.builtin:GuessNumberEnv`` (a text game).
"""

from rlalign_ray.envs.base import Env, EnvError, StepResult, env_class

__all__ = ["Env", "EnvError", "StepResult", "env_class"]
