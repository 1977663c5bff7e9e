"""Where episodes' environments live: ``EnvHost`` holds one instance per episode and calls
them concurrently within ``env.timeout_s``. A generator uses one in its own process
(``env.num_actors: 0``), or talks to a pool of them (``pools/env.py``'s ``EnvPool``, for
heavy environments: a sandbox, a simulator) through ``RemoteEnvs``."""

from __future__ import annotations

from typing import Any

from rlalign_ray.config import EnvConfig
from rlalign_ray.envs.base import Env, EnvError, call_all, env_class


class EnvHost:
    """Environment instances by episode key. A plain class; ``EnvPool`` runs it as an actor
    (``rank``: its index in the pool)."""

    def __init__(self, cfg: EnvConfig, rank: int = 0):
        self.cfg, self.rank = cfg, rank
        self.cls = env_class(cfg.path)
        self.envs: dict[Any, Env] = {}

    def reset(self, keys: list[Any], items: list[Any], names: list[str]) -> list[Any]:
        for key, name in zip(keys, names):
            try:
                self.envs[key] = self.cls(**self.cfg.kwargs)
            except Exception as e:
                raise EnvError(
                    f"{self.cls.__name__}(**env.kwargs) failed for {name}: {type(e).__name__}: {e}"
                ) from e
        return call_all(
            [
                (self.envs[k].reset, (it,), self._what(n, "reset"))
                for k, it, n in zip(keys, items, names)
            ],
            self.cfg.timeout_s,
        )

    def step(self, keys: list[Any], actions: list[str], names: list[str]) -> list[Any]:
        return call_all(
            [
                (self.envs[k].step, (a,), self._what(n, "step"))
                for k, a, n in zip(keys, actions, names)
            ],
            self.cfg.timeout_s,
        )

    def close(self, keys: list[Any]) -> None:
        for key in keys:
            env = self.envs.pop(key, None)
            if env is not None and callable(getattr(env, "close", None)):
                env.close()

    def ping(self) -> int:
        return self.rank

    def _what(self, name: str, call: str) -> str:
        where = f" (environment actor {self.rank})" if self.rank >= 0 else ""
        return f"environment {self.cfg.path}{where} {call} of {name}"


class LocalEnvs:
    """The generator's own environments (``env.num_actors: 0``)."""

    def __init__(self, cfg: EnvConfig):
        self.host = EnvHost(cfg, rank=-1)

    def reset(self, episodes: list[Any]) -> list[Any]:
        return self.host.reset(
            [ep.row for ep in episodes],
            [ep.item for ep in episodes],
            [ep.name() for ep in episodes],
        )

    def step(self, episodes: list[Any], actions: list[str]) -> list[Any]:
        names = [f"{ep.name()}, turn {ep.turns}" for ep in episodes]
        return self.host.step([ep.row for ep in episodes], actions, names)

    def close(self, episodes: list[Any]) -> None:
        self.host.close([ep.row for ep in episodes])


class RemoteEnvs:
    """Episodes spread over an environment pool's actors (episode row modulo the pool
    size); each turn, one call per actor carries all of its episodes' actions."""

    def __init__(self, cfg: EnvConfig, actors: list[Any], rank: int, timeout_s: float = 0.0):
        self.cfg, self.actors, self.rank = cfg, actors, rank
        # an actor's own calls are bounded by env.timeout_s; leave room for the transfer
        self.timeout_s = timeout_s or (cfg.timeout_s + 60.0 if cfg.timeout_s else 0.0)

    def _split(self, episodes: list[Any]) -> dict[int, list[int]]:
        parts: dict[int, list[int]] = {}
        for i, ep in enumerate(episodes):
            parts.setdefault(ep.row % len(self.actors), []).append(i)
        return parts

    def _key(self, ep: Any) -> tuple[int, int]:
        return (self.rank, ep.row)

    def _call(self, method: str, episodes: list[Any], values: list[Any], names: list[str]):
        import ray

        out: list[Any] = [None] * len(episodes)
        parts = self._split(episodes)
        refs = {
            a: getattr(self.actors[a], method).remote(
                [self._key(episodes[i]) for i in idx],
                [values[i] for i in idx],
                [names[i] for i in idx],
            )
            for a, idx in parts.items()
        }
        for a, ref in refs.items():
            try:
                results = ray.get(ref, timeout=self.timeout_s or None)
            except ray.exceptions.GetTimeoutError:
                raise EnvError(
                    f"environment actor {a} ({self.cfg.path}) did not answer {method} within "
                    f"{self.timeout_s:g}s for {len(parts[a])} episodes, first "
                    f"{names[parts[a][0]]}"
                ) from None
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                text = str(cause) if cause is not None else str(e).strip().splitlines()[-1]
                raise EnvError(text) from None
            except ray.exceptions.RayActorError as e:
                raise EnvError(
                    f"environment actor {a} ({self.cfg.path}) died during {method} of "
                    f"{names[parts[a][0]]}: {e}"
                ) from None
            for i, r in zip(parts[a], results):
                out[i] = r
        return out

    def reset(self, episodes: list[Any]) -> list[Any]:
        names = [ep.name() for ep in episodes]
        return self._call("reset", episodes, [ep.item for ep in episodes], names)

    def step(self, episodes: list[Any], actions: list[str]) -> list[Any]:
        names = [f"{ep.name()}, turn {ep.turns}" for ep in episodes]
        return self._call("step", episodes, actions, names)

    def close(self, episodes: list[Any]) -> None:
        for a, idx in self._split(episodes).items():
            self.actors[a].close.remote([self._key(episodes[i]) for i in idx])
