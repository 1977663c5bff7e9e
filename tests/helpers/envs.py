"""Environments used by the tests (loaded by module path, also inside Ray actors)."""

from __future__ import annotations

import time

from rlalign_ray.envs import Env, StepResult


class EchoEnv(Env):
    """Never ends on its own: answers every action with `` ok<turn>\\n`` and reward 0.25;
    records what it saw (in this process) in ``EchoEnv.log``."""

    log: list[tuple[int, list[str], list[str]]] = []

    def reset(self, item):
        self.item, self.actions, self.observations = item, [], []
        EchoEnv.log.append((item.index, self.actions, self.observations))
        return item.prompt

    def step(self, action):
        self.actions.append(action)
        obs = f" ok{len(self.actions)}\n"
        self.observations.append(obs)
        return StepResult(obs, 0.25)


class AsyncEchoEnv(EchoEnv):
    async def step(self, action):
        return EchoEnv.step(self, action)


class RaisesEnv(Env):
    def step(self, action):
        raise RuntimeError("the simulator crashed")


class HangsEnv(Env):
    def step(self, action):
        time.sleep(30)
        return StepResult("")


class BadReturnEnv(Env):
    def step(self, action):
        return ("obs", 1.0, False, False, {})
