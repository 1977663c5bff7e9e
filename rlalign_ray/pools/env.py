"""The environment pool: heavy environments (a sandbox, a simulator) in actors of their own.

    envs = EnvPool(cfg)                      # cfg.env.num_actors EnvHost actors
    with launch(cfg.run, gen, envs, ...):
        envs.attach(gen)                     # generators step their episodes there

Each actor holds many episodes' environment instances (``envs/host.py``'s ``EnvHost``);
a generator spreads its episodes over the actors and, each turn, sends every actor one
call with all of its episodes' actions.
"""

from __future__ import annotations

from rlalign_ray.config import Config, Placement, Resources
from rlalign_ray.pools.base import ActorPool


class EnvPool(ActorPool):
    role = "env"

    def __init__(
        self,
        cfg: Config,
        num_actors: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
    ):
        from rlalign_ray.envs.host import EnvHost
        from rlalign_ray.topology import resolve_class

        super().__init__(
            resolve_class(cls or EnvHost),
            lambda i: (cfg.env, i),
            num_actors or cfg.env.num_actors,
            resources or cfg.env.resources,
            placement or cfg.env.placement,
            name,
            cfg.run.call_timeout_s,
        )

    def attach(self, generators: ActorPool) -> None:
        """Make every generator of ``generators`` step its episodes in this pool."""
        generators.gather("set_env_actors", self.actors)
