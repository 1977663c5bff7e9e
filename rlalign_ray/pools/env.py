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
    restartable = False

    def __init__(
        self,
        cfg: Config,
        num_actors: int | None = None,
        resources: Resources | None = None,
        placement: Placement | None = None,
        cls: type | str | None = None,
        name: str | None = None,
    ):
        super().__init__(cfg, num_actors, resources, placement, cls, name)

    def actor_args(self, i: int) -> tuple:
        return (self.cfg.env, i)

    def attach(self, generators: ActorPool) -> None:
        """Make every generator of ``generators`` step its episodes in this pool."""
        generators.gather("set_env_actors", self.actors)
