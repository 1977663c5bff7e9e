"""The roles: which config section describes each, where its actor count lives, which class
runs it by default, and how a batch is split over a data-parallel role's ranks.

The one home for these facts, below everything that uses them (config checks, pools,
topologies, the learner's split): it imports only the config. Built-in classes are named by
``module:Class`` and imported on first use, so no module here pulls in torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlalign_ray.errors import ConfigError, UserCodeError

if TYPE_CHECKING:  # the config imports this module (its GPU layout checks)
    from rlalign_ray.config import Config, SyncConfig


def _always(cfg: Config) -> bool:
    return True


@dataclass(frozen=True)
class Role:
    """One kind of actor pool: the one table that the config checks, the default topology
    and pool building read (adding a role is one entry here and its pool class)."""

    section: str  # the config section: rollout, reward, reference, learner, critic, env
    count: str | None  # that section's actor-count field (None: one actor)
    builtin: str  # module:Class that runs the role unless actor_class says otherwise
    pool: str  # module:Class of its pool (``rlalign_ray.pools``), imported on first use
    default: Callable[[Config], bool] = _always  # whether the default topology starts it
    many: bool = False  # the built-in Trainer composes named pools of it (``pools:``)

    def num_actors(self, cfg: Config) -> int:
        return getattr(getattr(cfg, self.section), self.count) if self.count else 1


ROLES: dict[str, Role] = {
    "generator": Role(
        "rollout",
        "num_actors",
        "rlalign_ray.rollout.generator:Generator",
        "rlalign_ray.pools.generator:GeneratorPool",
        many=True,
    ),
    "reward": Role(
        "reward",
        "num_actors",
        "rlalign_ray.rewards.scorer:RewardScorer",
        "rlalign_ray.pools.reward:RewardPool",
        many=True,
    ),
    "learner": Role(
        "learner",
        "world_size",
        "rlalign_ray.learner.learner:Learner",
        "rlalign_ray.pools.learner:LearnerGroup",
    ),
    "reference": Role(
        "reference",
        None,
        "rlalign_ray.learner.reference:Reference",
        "rlalign_ray.pools.reference:ReferencePool",
        lambda cfg: cfg.needs_reference,
    ),
    "critic": Role(
        "critic",
        "world_size",
        "rlalign_ray.learner.critic:Critic",
        "rlalign_ray.pools.learner:CriticGroup",
        lambda cfg: cfg.needs_critic,
    ),
    "env": Role(
        "env",
        "num_actors",
        "rlalign_ray.envs.host:EnvHost",
        "rlalign_ray.pools.env:EnvPool",
        lambda cfg: bool(cfg.env.path and cfg.env.num_actors),
    ),
}
DEEPSPEED_ROLES = ("learner", "critic")  # roles whose actors form a process group
Layout = dict  # pool -> (config section, actor count, Resources, Placement)


def roles_of(cfg: Config) -> list[str]:
    """The roles a run of ``cfg`` starts (the default topology), in ``ROLES`` order."""
    return [name for name, role in ROLES.items() if role.default(cfg)]


def kind_of(cfg: Config, pool: str) -> str:
    """The role of pool ``pool``: a role's own name, or a named pool's ``kind``."""
    named = cfg.pools.get(pool)
    return named.kind if named is not None else pool


def pool_class(role: str) -> type:
    """The pool class (``rlalign_ray.pools``) of ``role``."""
    return import_object(ROLES[role].pool, "class")


def resolve_class(cls: type | str) -> type:
    """A class, or ``module:Class`` imported (``import_object``); a clear error naming it
    otherwise."""
    if isinstance(cls, type):
        return cls
    try:
        return import_object(cls, "class")
    except UserCodeError as e:
        raise ConfigError([f"actor_class {cls!r} (module:Class): {e}"]) from None


def import_object(path: str, kind: str = "object") -> Any:
    """``module:name`` -> the object: how a config names the user's reward functions,
    environments and actor classes. The working directory is searched too (appended to
    ``sys.path``, so a file there never hides an installed module), in the driver as in
    the workers (whose working directory is the run's: ``runtime.cluster.connect``). A
    ``UserCodeError`` says what failed, where the module was looked for, and the fix."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserCodeError(f"write it as 'package.module:{kind}', got {path!r}")
    cwd = os.getcwd()
    if cwd not in {os.path.abspath(p) for p in sys.path}:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserCodeError(_not_found(module_name, e)) from None
        raise UserCodeError(
            f"importing module {module_name!r} raised ModuleNotFoundError: {e}; install "
            "what the module needs (in every node's environment), or fix the module"
        ) from None
    except Exception as e:  # the user's module fails while importing
        raise UserCodeError(
            f"importing module {module_name!r} raised {type(e).__name__}: {e}; fix the module"
        ) from None
    if not hasattr(module, attr):
        where = getattr(module, "__file__", None) or module_name
        raise UserCodeError(
            f"module {module_name!r} ({where}) has no {kind} {attr!r}; check the name after the ':'"
        )
    return getattr(module, attr)


def _not_found(module: str, e: ModuleNotFoundError) -> str:
    """Where ``module`` was looked for: the working directory and the ``sys.path`` entries
    outside the Python installation (PYTHONPATH's, a script's folder)."""
    system = tuple(os.path.join(os.path.abspath(p), "") for p in {sys.prefix, sys.base_prefix})
    searched = [os.getcwd()]
    for p in map(os.path.abspath, sys.path):
        if p not in searched and not os.path.join(p, "").startswith(system):
            searched.append(p)
    head = module.split(".")[0]
    also = f", in {', '.join(searched[1:])}" if searched[1:] else ""
    return (
        f"cannot import module {module!r} ({e}); looked in the working directory "
        f"{searched[0]}{also} and in the installed packages. Put {head}.py (or the package "
        f"folder {head}/) in the working directory you run rlalign-ray from, install it, "
        "or add its folder to PYTHONPATH"
    )


def role_class(role: str, cls: type | str | None = None, cfg: Config | None = None) -> type:
    """The class that runs ``role``: ``cls``, else the config's ``actor_class``, else the
    built-in one."""
    section = getattr(cfg, ROLES[role].section, None) if cfg is not None else None
    return resolve_class(cls or getattr(section, "actor_class", None) or ROLES[role].builtin)


def role_layout(cfg: Config, pools: dict[str, tuple] | None = None) -> Layout:
    """pool -> (config section, actor count, resources, placement): the config's roles and
    named pools (``pools.<name>``), or ``pools`` (name -> (count, resources, placement), a
    topology's)."""
    if pools is None:
        pools = {
            r: (ROLES[r].num_actors(cfg), sec.resources, sec.placement)
            for r in roles_of(cfg)
            for sec in [getattr(cfg, ROLES[r].section)]
        }
        pools.update({n: (p.num_actors, p.resources, p.placement) for n, p in cfg.pools.items()})
    return {
        r: (ROLES[r].section if r in ROLES else f"pools.{r}", *spec) for r, spec in pools.items()
    }


def split_rows(n: int, world_size: int, seed: int, step: int, lengths: Any = None) -> list[Any]:
    """Each rank's rows of an n-row batch: a seeded split, the same wherever it is computed
    (the split task cuts token batches with it, the driver per-row tensors). Every rank
    gets n / world_size rows; a batch that does not divide is refused, never cut short.

    With ``lengths`` ((n,) tokens per row; packed training) the split is balanced by tokens:
    rows, longest first (ties in the seeded order), each go to the rank with the fewest
    tokens among those not yet full (a greedy equal-count partition)."""
    import torch

    if n % world_size:
        raise ValueError(
            f"a batch of {n} rows does not split evenly over {world_size} ranks; no row may "
            "be dropped, so give the group a multiple of its world size"
        )
    g = torch.Generator().manual_seed(seed * 7919 + step)
    perm = torch.randperm(n, generator=g)
    per = n // world_size
    if lengths is None or world_size == 1:
        return [perm[k * per : (k + 1) * per].sort().values for k in range(world_size)]
    size = torch.as_tensor(lengths)[perm].tolist()
    parts: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(n), key=lambda k: -size[k]):  # stable: ties in the seeded order
        k = min((k for k in range(world_size) if len(parts[k]) < per), key=lambda k: load[k])
        parts[k].append(int(perm[i]))
        load[k] += size[i]
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def bundle_gpus(roles: Layout) -> dict[str, list]:
    """host role -> per bundle, the GPUs it holds and who shares it: [(gpus, [(role,
    actor index)])]. A colocated role's actor j shares its host's bundle j % n (as
    ``runtime.placement.plan_bundles`` places them)."""
    out: dict[str, list] = {}
    for role, (_, n, res, p) in roles.items():
        if not p.colocate_with:
            out[role] = [[res.num_gpus, [(role, j)]] for j in range(n)]
    for role, (_, n, res, p) in roles.items():
        host = out.get(p.colocate_with or "")
        for j in range(n if host else 0):
            b = host[j % len(host)]
            b[0] += res.num_gpus
            b[1].append((role, j))
    return out


def gpu_layout_problems(
    roles: Layout, sync: SyncConfig, kinds: dict[str, str] | None = None
) -> list[str]:
    """Layouts that would fail on GPUs: a colocated bundle of a fractional GPU count above 1
    (Ray may give its actors different GPUs, so they share nothing), and an NCCL weight sync
    that includes a generator on learner rank 0's GPU or generators on fractional GPUs of
    their own (NCCL refuses two ranks on one GPU: "Duplicate GPU detected"). ``kinds``:
    each named pool's role (the generator checks cover every generator pool)."""
    e: list[str] = []
    for host, bundles in bundle_gpus(roles).items():
        for k, (gpus, members) in enumerate(bundles):
            if gpus > 1 and abs(gpus - round(gpus)) > 1e-9 and len(members) > 1:
                who = ", ".join(
                    f"{roles[r][0]}.resources.num_gpus={roles[r][2].num_gpus:g}"
                    for r in dict.fromkeys(r for r, _ in members)
                )
                e.append(
                    f"{roles[host][0]}.placement: bundle {k} of {host} holds {gpus:g} GPUs "
                    f"({who}, colocated): Ray may give a fractional share from another GPU "
                    "than the whole one, so the colocated actors would share nothing. Make "
                    "each colocated bundle's GPUs sum to at most 1 (sharing one GPU, e.g. "
                    "0.5 + 0.5) or to a whole number (one GPU each)"
                )
    gens = [r for r in roles if (kinds or {}).get(r, r) == "generator"]
    for gen in gens:
        e += _fractional_nccl_problems(roles[gen], sync)
    learner = bundle_gpus(roles).get("learner")
    if not learner or sync.transport != "collective" or sync.backend == "gloo":
        return e
    gpus, members = learner[0]
    for gen in gens:
        on_rank0 = [j for r, j in members if r == gen]
        if on_rank0 and 0 < gpus <= 1 and roles[gen][2].num_gpus > 0:
            e.append(
                f"sync.transport: collective (NCCL) cannot include {gen} {on_rank0[0]}: "
                f"{roles[gen][0]}.placement.colocate_with: learner puts it on learner rank "
                "0's GPU, and NCCL refuses two ranks on one GPU. Use sync.transport: auto "
                "(CUDA IPC for generators that share a learner rank's GPU) or cuda_ipc"
            )
    return e


def _fractional_nccl_problems(gen: tuple, sync: SyncConfig) -> list[str]:
    """Generators (one pool's layout entry) on a fraction of a GPU, not colocated, in a
    weight sync that goes over NCCL (``collective``, or ``auto``, which picks NCCL for
    generators with GPUs of their own): Ray packs fractional actors onto one GPU, so two
    generators (or one and a fractional learner rank) can hold two ranks of the group on
    one GPU."""
    if sync.transport not in ("auto", "collective") or sync.backend == "gloo":
        return []
    section, _, res, placement = gen
    gpus = res.num_gpus
    if placement.colocate_with or gpus <= 0 or abs(gpus - round(gpus)) < 1e-9:
        return []
    return [
        f"{section}.resources.num_gpus: {gpus:g} GPU per generator, not colocated "
        f"({section}.placement.colocate_with unset), with sync.transport: {sync.transport} "
        f"(NCCL on GPUs): Ray may pack two generators, or a generator and a learner rank, "
        "onto one GPU, and NCCL refuses two ranks of the weight-sync group on one GPU "
        '("Duplicate GPU detected", shown as "could not join the nccl group"). Give each '
        f"generator whole GPUs ({section}.resources.num_gpus: 1), colocate the generators "
        f"with the learner ({section}.placement.colocate_with: learner, CUDA IPC), or sync "
        "through host memory (sync.transport: object_store)"
    ]
