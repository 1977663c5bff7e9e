"""The math answer reward (``type: math``) on chat-style completions of an instruct model that
reasons first and answers last, plain and conversational, through ``load_components`` (the
reward scorer's path, in a worker thread: tests/unit/test_rewards.py)."""

from __future__ import annotations

import pytest
import torch

from rlalign_ray.config import RewardSpec, config_from_dict
from rlalign_ray.errors import ConfigError
from rlalign_ray.rewards.math_answer import MathVerifier, extract_answer, gold_answer
from rlalign_ray.rewards.sources import RewardInputs, load_components

pytest.importorskip("math_verify")
CPU = torch.device("cpu")
GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)

# (completion, gold, correct, formatted): replies as an instruct model writes them
CASES = [
    (
        "Let's compute step by step. Tom has 3 bags with 6 apples each, so 3 × 6 = 18.\n\n"
        "So the total is 18 apples. \\boxed{18}",
        "18", 1.0, 1.0,
    ),
    (
        "In May she sold half as many: 48 / 2 = 24 clips.\nAltogether: 48 + 24 = 72 clips.\n"
        "#### 72",
        GSM8K_GOLD, 1.0, 1.0,
    ),
    ("3 of the 4 balls are red. The answer is $\\frac{3}{4}$.", "0.75", 1.0, 0.0),
    ("0.75", "\\frac{3}{4}", 1.0, 0.0),
    ("3/4", "0.75", 1.0, 0.0),
    ("She has 5 + 7 = 12 pencils.\n\n\\boxed{12}", "13", 0.0, 1.0),  # wrong
    ("I am not sure how to solve this problem.", "5", 0.0, 0.0),  # no answer
    ("At first I got \\boxed{10}, but 4 + 7 = 11, so \\boxed{11}.", "11", 1.0, 1.0),
    (
        "Each ticket costs \\$8, so 9 tickets cost 9 × 8 = 72 dollars.\n\n"
        "**Final answer:** \\boxed{\\$72}",
        "72", 1.0, 1.0,
    ),
    ("The rope is 2 × 36 = 72 cm long.", "72", 1.0, 0.0),  # a unit after the number
    ("So he pays \\boxed{72 \\text{ dollars}}.", "#### 72", 1.0, 1.0),
    ("It falls from 3 to 3 - 8 = -5 degrees. \\boxed{-5}", "-5", 1.0, 1.0),
    ("From 3 degrees it falls 8, to -5.", "-5", 1.0, 0.0),
    ("They earned 1,250 + 2,000 = 3,250 dollars.\n#### 3,250", "3250", 1.0, 1.0),
    ("Half of them, \\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
    ("<think>17 + 1 = 18. Or was it 17?</think>\nThe answer is 18.", "18", 1.0, 0.0),
    ("<think>The sum is 18.</think>\nThe sum is 17.", "18", 0.0, 0.0),  # thinking skipped
    ("<think>So far 3 + 15 = 18, and then", "18", 0.0, 0.0),  # cut off while thinking
    ("The answer is 4.", None, None, None),  # no gold answer: neither component applies
]  # fmt: skip


@pytest.fixture(scope="module")
def math_parts():
    parts = load_components(RewardSpec(type="math", format_weight=0.1), CPU)
    yield parts
    parts[0][0].verifier.close()


def test_extraction_order_boxed_then_hashes_then_last_number():
    assert extract_answer("x \\boxed{\\frac{a}{b+\\{c\\}}} y") == ("\\frac{a}{b+\\{c\\}}", "boxed")
    assert extract_answer("\\boxed{3} ... #### 4") == ("3", "boxed")
    assert extract_answer("7 apples\n#### 4 ") == ("4", "####")
    assert extract_answer("10 - 3 = 7, then 7 - 2") == ("2", "number")  # minus, not negative
    assert extract_answer("x = -2.5 and y = .5") == (".5", "number")
    assert extract_answer("total 1,234,567 items") == ("1,234,567", "number")
    assert extract_answer("no digits") == (None, "")
    assert gold_answer(GSM8K_GOLD) == "72" and gold_answer(72) == "72"
    assert gold_answer("The answer is \\boxed{\\dfrac{3}{4}}") == "\\dfrac{3}{4}"


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "conversational"])
def test_chat_style_completions_are_scored_by_value(math_parts, chat):
    (correct, w), (formatted, fw) = math_parts
    assert (correct.name, w, formatted.name, fw) == ("math", 1.0, "math_format", 0.1)
    prompt = [{"role": "user", "content": "How many?"}] if chat else "How many?"
    inputs = RewardInputs.of(
        [prompt] * len(CASES), [c[0] for c in CASES], {"answer": [c[1] for c in CASES]}
    )
    assert inputs.conversational == chat
    got = list(zip(correct(inputs), formatted(inputs)))
    want = [(c[2], c[3]) for c in CASES]
    bad = [(c[0], g, w) for c, g, w in zip(CASES, got, want) if g != w]
    assert not bad, bad


def test_a_dead_checker_scores_its_sample_0_and_a_new_one_does_the_rest():
    v = MathVerifier()
    assert v.check([("1", "1")]) == [1.0]
    v.child.proc.kill()  # as if it hung in C code past its deadline, or died
    v.child.proc.wait()
    assert v.check([("2", "2"), ("3", "3"), ("3", "4")]) == [0.0, 1.0, 0.0]
    assert v.timeouts == 1
    v.close()


def test_config_checks_of_a_math_reward(tmp_path):
    bad = {"type": "math", "path": "my:fn", "answer_key": ""}
    with pytest.raises(ConfigError) as e:
        config_from_dict({"reward": {"rewards": [bad]}})
    text = str(e.value)
    assert "reward.rewards[0].answer_key: name the dataset column" in text
    assert "reward.rewards[0].path: a math reward takes no path" in text


def test_math_reward_without_math_verify_names_the_extra(monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "math_verify" else find(name, *a),
    )
    with pytest.raises(
        ConfigError, match=r"reward.rewards\[0\].type: math .* pip install 'rlalign-ray\[math\]'"
    ):
        config_from_dict({"reward": {"rewards": [{"type": "math"}]}})
