"""The GPU layout the default topology asks for: which roles start, which bundles they share
and the layouts that would fail on GPUs (used by ``checks`` and by ``rlalign_ray.topology``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlalign_ray.config.fields import Placement, Resources

if TYPE_CHECKING:
    from rlalign_ray.config.generation import SyncConfig
    from rlalign_ray.config.tree import Config


def role_sections(cfg: Config) -> dict[str, tuple[str, int, Resources, Placement]]:
    """role -> (config section, actor count, resources, placement) for the roles ``cfg``
    starts (the default topology)."""
    roles = {
        "generator": ("rollout", cfg.rollout.num_actors),
        "reward": ("reward", cfg.reward.num_actors),
        "learner": ("learner", cfg.learner.world_size),
    }
    if cfg.needs_reference:
        roles["reference"] = ("reference", 1)
    if cfg.needs_critic:
        roles["critic"] = ("critic", cfg.critic.world_size)
    if cfg.env.path and cfg.env.num_actors:
        roles["env"] = ("env", cfg.env.num_actors)
    return {
        role: (sec, n, getattr(cfg, sec).resources, getattr(cfg, sec).placement)
        for role, (sec, n) in roles.items()
    }


def bundle_gpus(roles: dict[str, tuple[str, int, Resources, Placement]]) -> dict[str, list]:
    """host role -> per bundle, the GPUs it holds and who shares it: [(gpus, [(role,
    actor index)])]. A colocated role's actor j shares its host's bundle j % n (as
    ``runtime.pools.plan_bundles`` places them)."""
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
    roles: dict[str, tuple[str, int, Resources, Placement]], sync: SyncConfig
) -> list[str]:
    """Layouts that would fail on GPUs: a colocated bundle of a fractional GPU count above 1
    (Ray may give its actors different GPUs, so they share nothing), and an NCCL weight sync
    that includes a generator on learner rank 0's GPU (NCCL refuses two ranks on one
    GPU: "Duplicate GPU detected")."""
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
    learner = bundle_gpus(roles).get("learner")
    if not learner or sync.transport != "collective" or sync.backend == "gloo":
        return e
    gpus, members = learner[0]
    on_rank0 = [j for r, j in members if r == "generator"]
    if on_rank0 and 0 < gpus <= 1 and roles["generator"][2].num_gpus > 0:
        e.append(
            f"sync.transport: collective (NCCL) cannot include generator {on_rank0[0]}: "
            "rollout.placement.colocate_with: learner puts it on learner rank 0's GPU, and "
            "NCCL refuses two ranks on one GPU. Use sync.transport: auto (CUDA IPC for "
            "generators that share a learner rank's GPU) or cuda_ipc"
        )
    return e
