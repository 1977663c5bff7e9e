"""The deployment files in cluster/ and the launch scripts: they parse, carry the fields
their tools require, and the training command each one runs names a config that loads.

Fast and offline: nothing here starts a cluster (see test_job_submit.py for that)."""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rlalign_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
SHELL_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".sh", ".sbatch"))
LAUNCH_SCRIPTS = [REPO / "launch/submit.sh", REPO / "launch/local_cluster.sh"]
GPU_CHECK = REPO / "launch/gpu_check.sh"  # parsed and --help'd with the launch scripts
EXPECTED = [
    "aws_gpu.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "slurm/rlalign_ray.sbatch",
    "README.md",
]


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{_rel(path)} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{_rel(path)}: top level must be mappings"
    return docs


def _check_train_command(cmd: str, where: str) -> str:
    """``rlalign-ray train CONFIG [overrides]`` with CONFIG a loadable file in configs/;
    returns its ``trainer.output_dir``."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["rlalign-ray", "train"], (
        f"{where}: not an rlalign-ray train command: {cmd!r}"
    )
    assert len(argv) >= 3, f"{where}: no config in {cmd!r}"
    config, overrides = argv[2], argv[3:]
    path = REPO / config
    assert config.startswith("configs/") and path.is_file(), f"{where}: {config} is not in configs/"
    assert all("=" in o for o in overrides), f"{where}: overrides must be key=value: {overrides}"
    return load_config(path, overrides).trainer.output_dir  # ConfigError lists every problem


def _train_commands(text: str) -> list[str]:
    """Every ``rlalign-ray train configs/...`` written in a file (comments included)."""
    pattern = r"rlalign-ray train configs/\S+(?: [\w.]+=\S+)*"
    return [m.group(0) for m in re.finditer(pattern, text)]


def test_expected_files_exist():
    missing = [f for f in EXPECTED if not (CLUSTER / f).is_file()]
    assert not missing, f"missing from cluster/: {missing}"
    assert (REPO / "configs/gpu_cluster.yaml").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    _docs(path)


@pytest.mark.parametrize("path", SHELL_FILES + LAUNCH_SCRIPTS + [GPU_CHECK], ids=_rel)
def test_shell_syntax(path):
    bash = shutil.which("bash")
    assert bash
    r = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"bash -n {_rel(path)}:\n{r.stderr}"
    assert path.read_text().startswith("#!"), f"{_rel(path)} has no shebang line"


def test_cluster_launcher_config():
    (cfg,) = _docs(CLUSTER / "aws_gpu.yaml")
    for key in (
        "cluster_name",
        "provider",
        "head_node_type",
        "available_node_types",
        "setup_commands",
    ):
        assert cfg.get(key), f"aws_gpu.yaml: {key} missing or empty"
    assert cfg["provider"].get("type"), "provider.type missing"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all("node_config" in t and "max_workers" in t for t in workers)
    assert any("pip install" in c and "rlalign-ray" in c for c in cfg["setup_commands"]), (
        "setup_commands must install the project"
    )
    mounts = cfg.get("file_mounts", {})
    assert any(src in (".", "./") for src in mounts.values()), "the repo is not mounted"
    text = (CLUSTER / "aws_gpu.yaml").read_text()
    assert "ray up cluster/aws_gpu.yaml" in text and "ray job submit" in text
    cmds = _train_commands(text)
    assert cmds, "aws_gpu.yaml: no `rlalign-ray train configs/...` example"
    for cmd in cmds:
        # the learner ranks on the GPU workers write checkpoints and final/: to a bucket
        out = _check_train_command(cmd, "aws_gpu.yaml")
        assert out.startswith("s3://"), f"aws_gpu.yaml: {cmd} writes to {out}, not a bucket"
    assert any("[s3]" in c for c in cfg["setup_commands"]), "install 'rlalign-ray[s3]'"
    for name in workers_of(cfg):  # every node that runs learner ranks may write the bucket
        assert types[name]["node_config"].get("IamInstanceProfile"), f"{name}: no IAM profile"
    assert "rsync-down" not in text, "the head holds no checkpoint: copy from the bucket"


def workers_of(cfg: dict) -> list[str]:
    return [name for name in cfg["available_node_types"] if name != cfg["head_node_type"]]


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head, f"{where}: headGroupSpec.rayStartParams"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    gpu_groups = 0
    for g in groups:
        assert g.get("groupName") and "rayStartParams" in g, f"{where}: worker group fields"
        for c in g["template"]["spec"]["containers"]:
            assert c.get("image")
            if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0:
                gpu_groups += 1
    assert gpu_groups, f"{where}: no worker group has nvidia.com/gpu limits"


def _pods(spec: dict) -> list[dict]:
    """The pod specs of a RayCluster spec: the head's, then each worker group's."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_kuberay_raycluster():
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay/raycluster.yaml")}
    doc = docs["RayCluster"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"], "raycluster.yaml")
    # one ReadWriteMany claim, mounted at the same path in the head and every worker pod
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    mounts = set()
    for pod in _pods(doc["spec"]):
        volumes = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        }
        found = [
            m["mountPath"]
            for c in pod["containers"]
            for m in c.get("volumeMounts", [])
            if m["name"] in volumes
        ]
        assert found, f"raycluster.yaml: a pod does not mount {claim['metadata']['name']}"
        mounts.update(found)
    assert len(mounts) == 1, f"raycluster.yaml: the shared volume is mounted at {mounts}"
    (mount,) = mounts
    text = (CLUSTER / "kuberay/raycluster.yaml").read_text()
    outs = re.findall(r"trainer\.output_dir=(\S+)", text)
    assert outs and all(o.startswith((mount + "/", "s3://")) for o in outs), outs


def test_kuberay_rayjob():
    (doc,) = _docs(CLUSTER / "kuberay/rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    out = _check_train_command(spec["entrypoint"], "rayjob.yaml entrypoint")
    # the cluster is deleted with the job: the outputs go to a bucket every pod can write
    assert spec["shutdownAfterJobFinishes"] and out.startswith("s3://"), out
    for pod in _pods(spec["rayClusterSpec"]):
        creds = pod.get("serviceAccountName") or [
            e for c in pod["containers"] for e in c.get("envFrom", []) if "secretRef" in e
        ]
        assert creds, "rayjob.yaml: a pod has no credentials for the bucket"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and "working_dir" in runtime_env
    _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml rayClusterSpec")


def test_slurm_script():
    text = (CLUSTER / "slurm/rlalign_ray.sbatch").read_text()
    assert "#SBATCH --nodes=" in text
    assert re.search(r"srun .*\n?\s*ray start --head --block", text), "no head `ray start --block`"
    assert re.search(r"ray start --block --address", text), "no worker `ray start --block`"
    assert 'rlalign-ray train "$CONFIG"' in text
    assert "trap cleanup EXIT" in text
    # outputs on the shared submit dir by default, seen by every node before Ray starts
    assert re.search(r'OVERRIDES=\("trainer\.output_dir=\$PWD/', text)
    probe = text.index('srun --overlap --nodes="$NUM_NODES"', text.index("PROBE="))
    assert probe < text.index("ray start --head")
    # Preflight before Ray starts: the config loads, and vllm imports on every node.
    assert "rlalign-ray check-config" in text and "python -c 'import vllm'" in text
    # The example in the header names a real config.
    cmds = re.findall(r"sbatch (?:--\S+ )*cluster/slurm/rlalign_ray.sbatch (configs/\S+)", text)
    assert cmds
    for config in cmds:
        _check_train_command(f"rlalign-ray train {config}", "rlalign_ray.sbatch header")


def _configs_named(text: str) -> set[str]:
    """Every ``configs/*.yaml`` a file names (its train command, submit line or header)."""
    return set(re.findall(r"configs/[\w./-]+\.ya?ml", text))


@pytest.mark.parametrize("path", YAML_FILES + SHELL_FILES, ids=_rel)
def test_vllm_configs_get_vllm_installed(path):
    """A file that trains a ``rollout.backend: vllm`` config installs vLLM (the pinned
    launch/install_vllm.sh), else its generators fail at start-up on the cluster."""
    text = path.read_text()
    vllm = [c for c in _configs_named(text) if load_config(REPO / c).rollout.backend == "vllm"]
    if not vllm:
        pytest.skip(f"{_rel(path)} trains no vLLM config")
    assert "launch/install_vllm.sh" in text, (
        f"{_rel(path)} trains {vllm} (rollout.backend: vllm) but never runs "
        "launch/install_vllm.sh; install vLLM where the project is installed"
    )
    if path.name == "aws_gpu.yaml":  # after the project, whose torch vLLM's wheel pins
        cmds = _docs(path)[0]["setup_commands"]
        pip = next(i for i, c in enumerate(cmds) if "pip install" in c and "rlalign-ray" in c)
        vllm_at = next(i for i, c in enumerate(cmds) if "install_vllm.sh" in c)
        assert pip < vllm_at, "aws_gpu.yaml: run install_vllm.sh after `pip install -e`"


def test_readme_lists_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for f in EXPECTED[:-1]:
        assert f in readme, f"cluster/README.md does not mention {f}"


def test_gpu_config_shape():
    cfg = load_config(REPO / "configs/gpu_cluster.yaml")
    assert cfg.rollout.resources.num_gpus == 1
    assert cfg.learner.world_size == 4 and cfg.learner.resources.num_gpus == 1
    assert cfg.learner.zero_stage == 2 and cfg.learner.bf16 and cfg.model.dtype == "bfloat16"


ONE_NODE_CONFIGS = ["gpu_node.yaml", "gpu_node_7b.yaml", "gpu_colocated.yaml"]


def _bundle_gpus(cfg, where: str) -> list[float]:
    """The GPUs of each placement bundle ``cfg`` asks for (colocated roles share their
    host's bundles); a fractional bundle (roles sharing a GPU) must fit one GPU."""
    from rlalign_ray.runtime.placement import RoleSpec, plan_bundles
    from rlalign_ray.topology import Topology

    specs = [
        RoleSpec(role, object, p.num_actors, p.resources, placement=p.placement)
        for role, p in Topology.from_config(cfg).pools.items()
    ]
    gpus = [b.get("GPU", 0.0) for bundles in plan_bundles(specs).values() for b in bundles]
    for g in gpus:
        assert g <= 1 + 1e-9 or float(g).is_integer(), f"{where}: a bundle of {g:g} GPUs"
    return gpus


@pytest.mark.parametrize("name", ONE_NODE_CONFIGS)
def test_one_node_configs_fit_eight_gpus(name):
    """Each loads and validates, and its placement bundles fit one 8-GPU node."""
    cfg = load_config(REPO / "configs" / name)
    assert cfg.rollout.backend == "vllm" and cfg.model.dtype == "bfloat16" and cfg.learner.bf16
    assert cfg.sync.transport == "auto"
    gpus = _bundle_gpus(cfg, name)
    assert sum(gpus) <= 8 + 1e-9, f"{name}: {sum(gpus):g} GPUs on an 8-GPU node"
    if name == "gpu_colocated.yaml":
        assert cfg.rollout.placement.colocate_with == "learner" and cfg.rollout.enable_sleep_mode
        assert cfg.reference.placement.colocate_with == "learner"
        assert cfg.rollout.num_actors == cfg.learner.world_size == 8
    else:
        assert sum(gpus) == 8 and all(g == 1 for g in gpus if g)


def _bash_arrays(text: str) -> dict[str, list[str]]:
    """``NAME=(\n  words ...\n)`` blocks of a bash script, split as bash splits them."""
    found = re.finditer(r"^(\w+)=\(\n(.*?)^\)$", text, re.M | re.S)
    return {m.group(1): shlex.split(m.group(2), comments=True) for m in found}


def test_gpu_check_cases_load():
    """Each case of launch/gpu_check.sh (test_shell_syntax parses the script): its
    overrides (COMMON + CASE_*) load on configs/demo_cpu.yaml and ask for the GPUs its
    CASES line says it needs."""
    arrays = _bash_arrays(GPU_CHECK.read_text())
    cases = [line.split() for line in arrays.pop("CASES")]
    common = arrays.pop("COMMON")
    assert sorted(arrays) == sorted(c[2] for c in cases), "a CASE_* array without a CASES line"
    for name, need, array in cases:
        overrides = common + arrays[array] + ["trainer.steps=3"]
        cfg = load_config(REPO / "configs/demo_cpu.yaml", overrides)
        assert cfg.rollout.backend == "vllm" and cfg.model.path == "builtin:tiny-arith"
        assert not cfg.needs_reference and cfg.reward.resources.num_gpus == 0
        gpus = _bundle_gpus(cfg, f"gpu_check.sh {name}")
        assert math.ceil(sum(gpus) - 1e-9) == int(need), f"{name}: {gpus} GPUs, not {need}"
        colocated = cfg.rollout.placement.colocate_with is not None
        # NCCL refuses a group with two members on one GPU.
        assert not (colocated and cfg.sync.transport == "collective"), name


def test_launch_scripts_help():
    for script in LAUNCH_SCRIPTS + [GPU_CHECK]:
        r = subprocess.run(
            ["bash", str(script), "--help"], capture_output=True, text=True, check=False, timeout=30
        )
        assert r.returncode == 0 and "Usage" not in r.stderr, (script, r.stderr)
        assert script.name in r.stdout or "launch/" in r.stdout, r.stdout
