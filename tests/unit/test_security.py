"""Security checks of the package itself: what it unpickles and whose code it runs.

- no ``weights_only=False``, ``pickle.load(s)``, ``yaml.load`` / ``unsafe_load`` or
  ``torch.load`` without ``weights_only=True`` anywhere in ``rlalign_ray/``;
- random states (the only ``.pt`` files the project writes itself) load with
  ``weights_only=True``, and a file that needs arbitrary unpickling is refused;
- DeepSpeed's checkpoint engine is swapped for one that loads with ``weights_only=True``;
- ``model.trust_remote_code`` defaults to False and reaches every ``from_pretrained``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rlalign_ray import checkpoint
from rlalign_ray.config import Config
from rlalign_ray.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "rlalign_ray"


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_the_package_unpickles_nothing():
    banned = {
        r"weights_only\s*=\s*False": "weights_only=False",
        r"\bpickle\.loads?\(": "pickle.load",
        r"\bcloudpickle\.loads?\(": "cloudpickle.load",
        r"\byaml\.(unsafe_)?load\(": "yaml.load (use yaml.safe_load)",
        r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
    }
    found = [
        f"{p.relative_to(PACKAGE.parent)}:{text[: m.start()].count(chr(10)) + 1}: {what}"
        for p, text in _sources()
        for pattern, what in banned.items()
        for m in re.finditer(pattern, text)
    ]
    assert not found, "\n".join(found)


def test_every_torch_load_says_weights_only_true():
    calls = [
        (p, text[: m.start()].count("\n") + 1, text[m.start() : text.find(")", m.start()) + 1])
        for p, text in _sources()
        for m in re.finditer(r"\btorch\.load\(", text)
    ]
    assert calls  # the checker sees the calls
    unsafe = [
        f"{p.name}:{line}: {call}" for p, line, call in calls if "weights_only=True" not in call
    ]
    assert not unsafe, "\n".join(unsafe)


def test_random_states_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt"))
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


class Gadget:  # any class: unpickling it could run code
    pass


def test_a_file_needing_arbitrary_unpickling_is_refused(tmp_path):
    torch.save({"x": Gadget()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="weights_only=True"):
        checkpoint.load(tmp_path / "evil.pt")


def test_deepspeed_checkpoints_load_with_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    checkpoint.safe_checkpoint_engine(engine)
    ce = engine.checkpoint_engine
    assert isinstance(ce, TorchCheckpointEngine) and type(ce) is not TorchCheckpointEngine
    ce.save({"w": torch.ones(2), "stage": ZeroStageEnum.gradients}, str(tmp_path / "ok.pt"))
    assert ce.load(str(tmp_path / "ok.pt"))["stage"] == ZeroStageEnum.gradients
    torch.save({"x": Gadget()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        ce.load(str(tmp_path / "evil.pt"))


def test_trust_remote_code_is_off_unless_set_and_reaches_from_pretrained(monkeypatch):
    import transformers

    from rlalign_ray.models import loading

    assert Config().model.trust_remote_code is False
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop")

    for cls in ("AutoModelForCausalLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", record)
    for trust in (False, True):
        for fn in (loading.load_causal_lm, loading.load_tokenizer):
            with pytest.raises(RuntimeError, match="stop"):
                fn("some/model", trust_remote_code=trust) if fn is loading.load_tokenizer else fn(
                    "some/model", "float32", trust
                )
    assert seen == [False, False, True, True]
    # every other from_pretrained of a model or tokenizer in the package names the key
    # (or is a reward-model / embedding source, which never trusts remote code)
    for p, text in _sources():
        for m in re.finditer(r"trust_remote_code\s*=\s*([^,)\n]+)", text):
            value = m.group(1).strip()
            assert value in ("trust_remote_code", "False") or value.endswith(
                ".trust_remote_code"
            ), f"{p.name}: trust_remote_code={value}"


REPO = PACKAGE.parent


def test_every_launch_path_turns_token_auth_on_and_keeps_dashboards_local():
    import yaml

    from rlalign_ray.runtime.cluster import LOOPBACK

    local = (REPO / "launch/local_cluster.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in local and "RAY_AUTH_TOKEN_PATH=" in local
    assert "--dashboard-host 127.0.0.1" in local
    assert f'LOOPBACK="${{RLALIGN_LOOPBACK:-{LOOPBACK}}}"' in local
    assert '--node-ip-address "$LOOPBACK"' in local and "--node-ip-address 127.0.0.1" not in local
    submit = (REPO / "launch/submit.sh").read_text()
    assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in submit
    slurm = (REPO / "cluster/slurm/rlalign_ray.sbatch").read_text()
    assert "export RAY_AUTH_MODE=token" in slurm and "--dashboard-host=127.0.0.1" in slurm
    aws = yaml.safe_load((REPO / "cluster/aws_gpu.yaml").read_text())
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in aws[k]]
    starts = [c for c in starts if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert any("--dashboard-host=127.0.0.1" in c for c in aws["head_start_ray_commands"])
    assert any(k.endswith("/.ray/auth_token") for k in aws["file_mounts"])
    for name in ("raycluster.yaml", "rayjob.yaml"):
        docs = yaml.safe_load_all((REPO / "cluster/kuberay" / name).read_text())
        spec = next(d for d in docs if d.get("kind", "").startswith("Ray"))["spec"]
        spec = spec.get("rayClusterSpec", spec)
        assert spec["authOptions"]["mode"] == "token", name
