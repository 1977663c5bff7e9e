"""The reward-type registry (``rlalign_ray/rewards/types.py``): the config checks, the
preflight, ``train --help`` and the scorer all read it, and a type from outside the package
(``tests/helpers/reward_types.py``, named by path) works end to end without Ray."""

from __future__ import annotations

import pytest
from unit.test_rewards import _batch

from rlalign_ray.config import config_from_dict
from rlalign_ray.config_doc import config_help
from rlalign_ray.errors import ConfigError
from rlalign_ray.rewards.scorer import RewardScorer
from rlalign_ray.rewards.types import REWARD_TYPES, RewardContext, RewardType, preflight_rewards

OWN = "helpers.reward_types:ContainsWord"


def _problems(*rewards) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"reward": {"rewards": list(rewards)}})
    return e.value.problems


def test_every_type_is_a_registered_reward_type_that_help_lists():
    help_text = config_help(width=10_000)
    line = next(x for x in help_text.splitlines() if "reward.rewards[].type (" in x)
    assert f"({'|'.join(REWARD_TYPES)}|module:Class," in line
    for name, t in REWARD_TYPES.items():
        assert isinstance(t, RewardType) and t.name == name and t.description
        assert f"{name} ({', '.join(t.keys)}): {t.description}" in help_text


def test_a_type_from_outside_the_package_checks_and_scores_through_the_scorer():
    cfg = config_from_dict(
        {"reward": {"rewards": [{"type": OWN, "name": "seven", "kwargs": {"word": "7"}}]}}
    )
    ctx = RewardContext(columns=["answer"], dataset="train.jsonl", remote=False)
    preflight_rewards(cfg.reward.rewards, ctx)
    out = RewardScorer(cfg.reward).score(_batch(["17", "4", "7 7"]))
    assert out.breakdown["seven"].tolist() == [1.0, 0.0, 1.0]
    assert out.scores.tolist() == [1.0, 0.0, 1.0]
    # its own check, its own preflight
    assert _problems({"type": OWN}) == ["reward.rewards[0].kwargs.word: name the word to look for"]
    cfg.reward.rewards[0].kwargs["column"] = "solution"
    with pytest.raises(ConfigError, match=r"reward.rewards\[0\].kwargs.column: train.jsonl"):
        preflight_rewards(cfg.reward.rewards, ctx)


def test_a_type_that_does_not_exist_or_is_not_a_reward_type_is_a_config_error():
    (missing,) = _problems({"type": "helpers.reward_types:Nope"})
    assert missing.startswith("reward.rewards[0].type: 'helpers.reward_types:Nope'")
    assert "has no class 'Nope'" in missing
    (wrong,) = _problems({"type": "helpers.reward_types:NotAType"})
    assert "not a subclass of rlalign_ray.rewards.types.RewardType" in wrong
    (extra,) = _problems({"type": "math", "kwargs": {"word": "7"}})
    assert extra == "reward.rewards[0].kwargs: a math reward takes no kwargs; remove them"


def test_the_registry_and_its_checks_import_no_torch():
    """The config checks read the registry: it and the checks of every type stay torch-free
    (the sources are imported when a reward actor builds them)."""
    import subprocess
    import sys

    code = (
        "import sys; from rlalign_ray.config import RewardSpec; "
        "from rlalign_ray.rewards.types import check_reward_specs; "
        "check_reward_specs([RewardSpec(type=t, path='m:f', url='http://x') "
        "for t in ('function', 'model', 'embedding', 'http', 'math')]); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
