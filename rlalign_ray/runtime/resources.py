"""What a run needs and whether it fits: ``rlalign-ray check-config CONFIG --resources``.

Per role: actors x (CPUs, GPUs, reserved memory, custom resources), as Ray places them
(colocated roles share their host's bundles), and each actor's model memory, estimated
from the parameter count P (read from the model's config.json: no weights are loaded) and
the bytes per parameter:

- generator: P x bytes(rollout.dtype or model.dtype), plus what its backend says it takes
  (``BackendType.memory``, ``rollout/backends.py``): a vLLM engine on GPU takes its KV
  cache, up to ``rollout.vllm.gpu_memory_utilization`` of each of its GPUs (on CPU:
  ``rollout.vllm.kv_cache_gb``)
- reference: P x bytes(model.dtype)
- learner and critic (DeepSpeed, N = world_size ranks; their own P): weights w.P +
  gradients w.P + optimizer states k.P, w = 2 with bf16 else 4, k = 12 with bf16 (fp32
  master weights and AdamW's two moments) else 8 (sgd: 4 with bf16 else 0); ZeRO-1
  divides the optimizer states by N, ZeRO-2 the gradients too, ZeRO-3 the weights too;
  with LoRA, the weights only
- reward: 4 P for each model or embedding reward; functions, math and http rewards: 0

Activations, HF generation's KV cache and the CUDA context are not counted: keep headroom.
The needs are compared with this machine (CPU count, RAM, GPUs through torch) or, with an
address, with the connected cluster's nodes (``ray.nodes()``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from rlalign_ray.config import Config, Placement, Resources
from rlalign_ray.models.sizes import DTYPE_BYTES, ModelSize, model_size
from rlalign_ray.roles import DEEPSPEED_ROLES, role_layout
from rlalign_ray.runtime.placement import RoleSpec, plan_bundles

GiB = 1024**3
FORMULA = [
    "memory estimate per actor: P parameters x bytes each (generator, reference); learner and "
    "critic: w.P/(N if ZeRO-3) + w.P/(N if ZeRO>=2) + k.P/(N if ZeRO>=1), N ranks, w = 2 "
    "(bf16) or 4, k = 12 (AdamW with fp32 master weights, bf16) or 8 (fp32); activations, "
    "KV caches and the CUDA context not counted",
]
Sizer = Callable[[str, str], ModelSize]  # (path, kind) -> size


@dataclass
class Need:
    """One role's actors: what each asks Ray for, and its estimated model memory."""

    role: str
    actors: int
    resources: Resources
    placement: Placement
    memory_gb: float | None  # model memory per actor (None: the model's size is unknown)
    gpu_share: float = 0.0  # vLLM on GPU: the share of each of its GPUs it takes
    note: str = ""


@dataclass
class Node:
    """What one node (or this machine) has."""

    name: str
    cpus: float
    gpus: float
    memory_gb: float  # RAM (this machine) or Ray's memory resource (a cluster node)
    custom: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    gpu_memory_gb: float | None = None  # the smallest GPU's; None: unknown


def role_needs(
    cfg: Config, sizer: Sizer | None = None, sizes: dict[tuple[str, str], ModelSize] | None = None
) -> list[Need]:
    """Every role a run of ``cfg`` starts (and its dispatchers), with memory estimates;
    ``sizes`` collects the model sizes read, by (path, kind)."""
    sizes = {} if sizes is None else sizes

    def size(path: str, kind: str = "causal") -> int | None:
        if (path, kind) not in sizes:
            get = sizer or (lambda p, k: model_size(p, k, cfg.model.trust_remote_code))
            sizes[(path, kind)] = get(path, kind)
        return sizes[(path, kind)].params

    out = []
    for role, (section, n, res, place) in role_layout(cfg).items():
        memory, share, note = _memory(cfg, role, size)
        out.append(Need(role, n, res, place, memory, share, note))
    group = cfg.rollout.dispatch_group
    if group:
        n = math.ceil(cfg.rollout.num_actors / group)
        out.append(Need("dispatcher", n, Resources(num_cpus=0), Placement(), 0.0, note="none"))
    return out


def _memory(cfg: Config, role: str, size: Callable) -> tuple[float | None, float, str]:
    """(GiB per actor, vLLM's GPU share, what was counted) for one role."""
    m, r = cfg.model, cfg.rollout
    if role == "generator":
        p, b = size(m.path), DTYPE_BYTES[r.dtype or m.dtype]
        from rlalign_ray.rollout.backends import backend_type

        more = backend_type(r.backend).memory(r, on_gpu=bool(r.resources.num_gpus))
        if more.gpu_share:
            return _gb(p, b), more.gpu_share, f"weights; {more.note}"
        note = f"weights + {more.note}" if more.host_gb else "weights"
        return _gb(p, b, more.host_gb), 0.0, note
    if role == "reference":
        return _gb(size(m.reference or m.path), DTYPE_BYTES[m.dtype]), 0.0, "weights"
    if role in DEEPSPEED_ROLES:
        return _trained(cfg, role, size)
    if role == "reward":
        kinds = {"model": "classifier", "embedding": "encoder"}
        specs = [s for s in cfg.reward.rewards if s.type in kinds]
        counts = [size(s.path, kinds[s.type]) for s in specs]
        if any(c is None for c in counts):
            return None, 0.0, "reward models"
        return _gb(sum(counts), 4), 0.0, "reward models (fp32)" if specs else "none"
    return 0.0, 0.0, "none"


def _trained(cfg: Config, role: str, size: Callable) -> tuple[float | None, float, str]:
    """A DeepSpeed rank's weights, gradients and optimizer states (see the module doc)."""
    sec = getattr(cfg, role)
    path = (cfg.critic.path if role == "critic" else None) or cfg.model.path
    p = size(path)
    w = 2 if sec.bf16 else 4
    k = (4 if sec.bf16 else 0) + (8 if sec.optimizer == "adamw" else 0)
    if role == "learner" and cfg.learner.lora.rank:
        return _gb(p, w), 0.0, "weights (LoRA: adapters not counted)"
    n, z = sec.world_size, sec.zero_stage
    per = w / (n if z >= 3 else 1) + w / (n if z >= 2 else 1) + k / (n if z >= 1 else 1)
    how = f"weights + grads + {sec.optimizer} states, ZeRO-{z} over {n}"
    return _gb(p, per), 0.0, how


def _gb(params: int | None, bytes_per: float, extra_gb: float = 0.0) -> float | None:
    return None if params is None else params * bytes_per / GiB + extra_gb


def bundles(needs: list[Need]) -> list[tuple[str, dict[str, float], float | None, float]]:
    """Every placement bundle as Ray would get it (colocated roles in their host's):
    ``(host role, resources, model memory in GiB, vLLM GPU share)``."""
    specs = [RoleSpec(n.role, object, n.actors, n.resources, placement=n.placement) for n in needs]
    plan = plan_bundles(specs)
    mem = {r: [0.0] * len(b) for r, b in plan.items()}
    share = {r: [0.0] * len(b) for r, b in plan.items()}
    for n in needs:
        host = n.placement.colocate_with or n.role
        for j in range(n.actors):
            k = j % len(plan[host])
            if mem[host][k] is not None:
                mem[host][k] = None if n.memory_gb is None else mem[host][k] + n.memory_gb
            share[host][k] += n.gpu_share
    return [(r, b, mem[r][k], share[r][k]) for r, bs in plan.items() for k, b in enumerate(bs)]


def totals(needs: list[Need]) -> dict[str, float]:
    """CPU, GPU, reserved memory (GiB) and custom resources over every bundle."""
    out: dict[str, float] = {}
    for _, b, _, _ in bundles(needs):
        for key, v in b.items():
            out[key] = out.get(key, 0.0) + (v / GiB if key == "memory" else v)
    return out


def gpus_needed(needs: list[Need]) -> float:
    """Whole GPUs the bundles take: Ray gives a bundle's fraction of a GPU from one GPU, so
    fractional bundles are packed into whole GPUs (first fit, largest first)."""
    whole, used = 0.0, []
    fracs = [b.get("GPU", 0.0) for _, b, _, _ in bundles(needs)]
    for g in sorted(fracs, reverse=True):
        if g >= 1:
            whole += g
        elif g > 0:
            k = next((i for i, u in enumerate(used) if u + g <= 1 + 1e-9), None)
            if k is None:
                used.append(g)
            else:
                used[k] += g
    return whole + len(used)


def host_memory_gb(needs: list[Need]) -> float | None:
    """Model memory of the actors without GPUs (it lives in host RAM)."""
    total = 0.0
    for n in needs:
        if not n.resources.num_gpus:
            if n.memory_gb is None:
                return None
            total += n.actors * n.memory_gb
    return total


# ---- what there is ----------------------------------------------------------------------
def this_machine() -> Node:
    """This machine: its cores, RAM and CUDA GPUs (through torch)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    gpus, gpu_mem = 0, None
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            props = [torch.cuda.get_device_properties(i) for i in range(gpus)]
            gpu_mem = min(p.total_memory for p in props) / GiB
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPUs
        gpus = 0
    return Node("this machine", float(os.cpu_count() or 1), float(gpus), ram, gpu_memory_gb=gpu_mem)


def cluster_nodes() -> list[Node]:
    """The connected cluster's live nodes (Ray does not report GPU memory)."""
    import ray

    skip = ("CPU", "GPU", "memory", "object_store_memory")
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        custom = {
            k: v
            for k, v in res.items()
            if k not in skip and not k.startswith(("node:", "accelerator_type"))
        }
        name = f"{node.get('NodeManagerAddress')} ({str(node.get('NodeID'))[:8]})"
        labels = dict(node.get("Labels") or {})
        cpus, gpus, mem = res.get("CPU", 0.0), res.get("GPU", 0.0), res.get("memory", 0.0) / GiB
        out.append(Node(name, cpus, gpus, mem, custom, labels))
    return out


# ---- does it fit ------------------------------------------------------------------------
def shortfalls(needs: list[Need], nodes: list[Node], local: bool) -> tuple[list[str], list[str]]:
    """(what is short, notes): totals, each bundle on one node, host RAM, GPU memory."""
    where = "on this machine" if local else f"in the cluster ({len(nodes)} live nodes)"
    problems, notes = [], []
    have: dict[str, float] = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}
    for n in nodes:
        have["CPU"] += n.cpus
        have["GPU"] += n.gpus
        have["memory"] += n.memory_gb
        for k, v in n.custom.items():
            have[k] = have.get(k, 0.0) + v
    for key, v in {**totals(needs), "GPU": gpus_needed(needs)}.items():
        h = have.get(key, 0.0)
        if v <= h + 1e-9:
            continue
        if key == "CPU" and local:
            notes.append(
                f"CPUs: the roles ask for {v:g} logical CPUs and this machine has {h:g} cores; "
                "the embedded instance gives every role its CPUs (run.num_cpus) and they "
                "share the cores"
            )
            continue
        what = "reserved memory (resources.memory_gb)" if key == "memory" else key
        problems.append(f"{what}: {_fmt(key, v)} needed, {_fmt(key, h)} {where}")
    if not local:  # one machine: the totals say it all
        problems += _bundle_fits(needs, nodes)
    if any(n.memory_gb is None for n in needs):
        notes.append(
            "memory: a model's size is unknown (see its line), so its memory is not checked"
        )
    problems += _memory_fits(needs, nodes, where, notes)
    return list(dict.fromkeys(problems)), list(dict.fromkeys(notes))


def _bundle_fits(needs: list[Need], nodes: list[Node]) -> list[str]:
    """Every bundle must fit on one node whose labels match its role's node_labels."""
    labels = {n.role: n.placement.node_labels for n in needs}
    out, seen = [], set()
    for host, b, _, _ in bundles(needs):
        key = (host, tuple(sorted(b.items())))
        if key in seen:
            continue
        seen.add(key)
        want = labels.get(host) or {}
        fits = [
            n
            for n in nodes
            if all(n.labels.get(k) == v for k, v in want.items())
            and all(_has(n, k) + 1e-9 >= v for k, v in b.items())
        ]
        if not fits:
            on = f" with node labels {want}" if want else ""
            shown = {k: _fmt(k, v / GiB if k == "memory" else v) for k, v in b.items()}
            out.append(f"{host}: a bundle of {shown} fits on no single node{on}")
    return out


def _has(node: Node, key: str) -> float:
    if key == "memory":
        return node.memory_gb * GiB
    return {"CPU": node.cpus, "GPU": node.gpus}.get(key, node.custom.get(key, 0.0))


def _memory_fits(needs: list[Need], nodes: list[Node], where: str, notes: list[str]) -> list[str]:
    """Host RAM for the actors without GPUs, and each GPU's memory for those with GPUs."""
    out = []
    host = host_memory_gb(needs)
    ram = sum(n.memory_gb for n in nodes)
    if host is not None and host > ram:
        out.append(
            f"host memory: the CPU actors' models take {host:.1f} GiB, {ram:.1f} GiB {where}"
        )
    sizes = [n.gpu_memory_gb for n in nodes if n.gpus]
    gpu = min(sizes) if sizes and None not in sizes else None
    why = "Ray does not report GPU memory" if "cluster" in where else "no GPU here to compare"
    for role, b, mem, share in bundles(needs):
        g = b.get("GPU", 0.0)
        if not g or mem is None:
            continue
        packed = 1 if g >= 1 else math.floor(1 / g + 1e-9)  # such bundles on one GPU
        fixed, engine = (mem / g, share) if g >= 1 else (mem * packed, share * packed)
        what = f"{fixed:.1f} GiB of models" + (
            f" + {engine:.0%} of it for engines" if engine else ""
        )
        if gpu is None:
            notes.append(f"GPU memory: each GPU of a {role} bundle holds {what} ({why})")
        elif fixed + engine * gpu > gpu + 1e-9:
            out.append(
                f"GPU memory: each GPU of a {role} bundle ({g:g} GPU) holds {what}, "
                f"{fixed + engine * gpu:.1f} GiB; the smallest GPU {where} has {gpu:.1f} GiB"
            )
    for n in needs:
        if n.gpu_share and gpu is not None and n.memory_gb is not None:
            budget = n.gpu_share * gpu * max(1.0, n.resources.num_gpus)
            if n.memory_gb > budget:
                out.append(
                    f"GPU memory: a {n.role}'s weights ({n.memory_gb:.1f} GiB) exceed its "
                    f"engine's share of its GPU ({n.gpu_share:.0%} of {gpu:.1f} GiB); raise "
                    "that share (rollout.vllm.gpu_memory_utilization) or the GPUs per generator"
                )
    return out


def _fmt(key: str, value: float) -> str:
    return f"{value:.1f} GiB" if key == "memory" else f"{value:g}"


# ---- the report -------------------------------------------------------------------------
def report(cfg: Config, name: str, nodes: list[Node], local: bool, sizer: Sizer | None = None):
    """``(text, fits)``: the needs table, the models, what there is, and the verdict."""
    sizes: dict[tuple[str, str], ModelSize] = {}
    needs = role_needs(cfg, sizer, sizes)
    lines = [
        f"resources for {name}",
        _row("role", "actors", "CPUs", "GPUs", "reserved", "model memory (estimate)"),
    ]
    for n in needs:
        r = n.resources
        mem = f"{r.memory_gb:g}G" if r.memory_gb else "-"
        est = _size(n.memory_gb)
        extra = f" +{r.custom}" if r.custom else ""
        on = f", with {n.placement.colocate_with}" if n.placement.colocate_with else ""
        lines.append(
            _row(n.role, n.actors, f"{r.num_cpus:g}", f"{r.num_gpus:g}", mem, f"{est} each")
            + f"  ({n.note}{on}){extra}"
        )
    t, host = totals(needs), host_memory_gb(needs)
    ram = _size(host)
    lines.append(
        _row("total", sum(n.actors for n in needs), f"{t.get('CPU', 0):g}",
             f"{gpus_needed(needs):g}", f"{t.get('memory', 0):g}G" if t.get("memory") else "-",
             f"host RAM {ram}")
        + "".join(f", {k}={v:g}" for k, v in t.items() if k not in ("CPU", "GPU", "memory"))
    )  # fmt: skip
    lines += _node_types(needs, nodes)
    for (path, kind), size in sizes.items():
        count = "size unknown" if size.params is None else f"{_count(size.params)} parameters"
        lines.append(f"model {path} ({kind}): {count} ({size.source})")
    lines += FORMULA
    lines += [_describe(n) for n in nodes]
    problems, notes = shortfalls(needs, nodes, local)
    lines += [f"note: {x}" for x in notes]
    if problems:
        lines.append("verdict: DOES NOT FIT. Short:")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append(f"verdict: fits {'this machine' if local else 'the cluster'}")
    return "\n".join(lines), not problems


def _row(*cells) -> str:
    widths = (11, 7, 6, 6, 8, 0)
    return "".join(
        f"{c!s:>{w}}  " if i else f"{c!s:<{w}}" for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()


def _node_types(needs: list[Need], nodes: list[Node]) -> list[str]:
    """Roles pinned to node types (custom resources, node labels), per type: what they ask
    for and which nodes offer it."""
    groups: dict[tuple, list[Need]] = {}
    for n in needs:
        host = next((h for h in needs if h.role == n.placement.colocate_with), n)
        key = (
            tuple(sorted(host.resources.custom)),
            tuple(sorted(host.placement.node_labels.items())),
        )
        if key != ((), ()):
            groups.setdefault(key, []).append(n)
    out = []
    for (custom, labels), members in groups.items():
        cpus = sum(n.actors * n.resources.num_cpus for n in members)
        gpus = sum(n.actors * n.resources.num_gpus for n in members)
        match = [
            n for n in nodes
            if all(n.custom.get(k) for k in custom) and all(n.labels.get(k) == v for k, v in labels)
        ]  # fmt: skip
        kind = ", ".join([*custom, *(f"{k}={v}" for k, v in labels)])
        out.append(
            f"node type [{kind}] ({', '.join(n.role for n in members)}): {cpus:g} CPUs, "
            f"{gpus:g} GPUs asked; {len(match)} such node(s) with "
            f"{sum(n.cpus for n in match):g} CPUs, {sum(n.gpus for n in match):g} GPUs"
        )
    return out


def _describe(n: Node) -> str:
    gpu = f" ({n.gpu_memory_gb:.0f} GiB each)" if n.gpu_memory_gb else ""
    extra = "".join(f", {k}={v:g}" for k, v in n.custom.items())
    labels = f", labels {n.labels}" if n.labels else ""
    mem = "RAM" if n.name == "this machine" else "memory"
    return f"{n.name}: {n.cpus:g} CPUs, {n.memory_gb:.1f} GiB {mem}, {n.gpus:g} GPUs{gpu}{extra}{labels}"


def _size(gb: float | None) -> str:
    if gb is None:
        return "unknown"
    return f"{gb:.1f} GiB" if gb >= 1 else f"{gb * 1024:.0f} MiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
