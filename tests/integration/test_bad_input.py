"""Bad input, table-driven: each row runs the real ``rlalign-ray train`` command, which must
end with exit status 2 and one message that names the key, ``file:line`` or function and
the fix, within 60 s (120 s for the rows that start actors), with no traceback, no process
left running and no output folder left behind.

Rows marked ``ray`` get past every check the driver runs before Ray starts (config, data,
model path, tokenizer, reward imports) and fail in an actor; the others fail in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import pytest
import yaml
from conftest import REPO, small_config

pytestmark = pytest.mark.integration

# The bound each row must end within. Rows marked ``ray`` start the whole topology first
# (Ray, the actors, DeepSpeed's learner): ~55 s on 2 idle cores, so they get twice the bound;
# a heavily shared machine may need RLALIGN_BAD_INPUT_LIMIT_S raised.
LIMIT_S = float(os.environ.get("RLALIGN_BAD_INPUT_LIMIT_S", "60"))


@dataclass
class Case:
    id: str
    overrides: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)  # substrings of the error message
    files: dict[str, str] = field(default_factory=dict)  # written to the run's folder
    config: str = "config.yaml"  # the config file given to the command
    ray: bool = False  # fails in an actor, after the embedded Ray instance starts
    full: bool = False  # only in the extended tier (RLALIGN_FULL_TESTS=1)


GOOD = '{"prompt": "1+2=", "answer": "3"}\n'
REWARD = "reward.rewards=[{{type: function, path: '{}'}}]"

CASES = [
    # ---- config files and keys ---------------------------------------------------------
    Case("config_missing", config="nope.yaml", expect=["config file", "nope.yaml", "not exist"]),
    Case("config_not_yaml", config="bad.yaml", files={"bad.yaml": "run: [1,\n"}, expect=["not valid YAML"]),
    Case("config_not_mapping", config="list.yaml", files={"list.yaml": "- 1\n"}, expect=["top level must be a mapping"]),
    Case("unknown_key", ["trainer.stepz=3"], ["trainer.stepz", "did you mean trainer.steps"]),
    Case("unknown_section", ["rollot.n_samples=2"], ["rollot: unknown key", "did you mean rollout"]),
    Case("override_syntax", ["trainer.steps"], ["'trainer.steps'", "key.path=value"]),
    Case("wrong_type_int", ["rollout.n_samples=eight"], ["rollout.n_samples", "expected an integer"]),
    Case("wrong_type_bool", ["trainer.tensorboard=maybe"], ["trainer.tensorboard", "expected true or false"]),
    Case("wrong_type_section", ["learner=3"], ["learner", "expected a mapping"]),
    Case("bad_algorithm", ["algorithm.name=ppx"], ["algorithm.name", "'ppx'", "use one of ppo, grpo"]),
    Case("bad_kl_estimator", ["algorithm.kl_estimator=k9"], ["algorithm.kl_estimator", "use one of"]),
    Case("bad_policy_loss", ["algorithm.policy_loss=helpers.rewards:nope"], ["algorithm.policy_loss", "cannot import the policy loss"]),
    Case("k3_in_reward", ["algorithm.name=reinforce_pp", "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true", "algorithm.kl_estimator=k3"], ["algorithm.kl_estimator: k3 in the reward", "E[k * grad log pi]"], full=True),
    Case("bad_backend", ["rollout.backend=tgi"], ["rollout.backend", "use one of hf, vllm"]),
    Case("bad_sync_transport", ["sync.transport=pigeon"], ["sync.transport", "use one of auto, collective"]),
    Case("negative_samples", ["rollout.n_samples=-1"], ["rollout.n_samples", "must be > 0"]),
    Case("zero_temperature", ["rollout.temperature=0"], ["rollout.temperature", "eval_temperature"]),
    Case("grpo_one_sample", ["rollout.n_samples=1"], ["rollout.n_samples", "n_samples >= 2"]),
    Case("mini_batch_not_divisor", ["learner.mini_batch_size=6"], ["learner.mini_batch_size", "divisor of 8"]),
    Case("micro_batch_split", ["learner.micro_batch_size=3"], ["learner.micro_batch_size", "multiple of world_size * micro_batch_size"]),
    Case("zero_stage", ["learner.zero_stage=4"], ["learner.zero_stage", "0, 1, 2 or 3"]),
    Case("no_train_data", ["data.train="], ["data.train", "give a JSONL or Parquet file"]),
    Case("no_rewards", ["reward.rewards=[]"], ["reward.rewards", "give at least one reward"]),
    Case("reward_path_no_colon", [REWARD.format("helpers.rewards")], ["reward.rewards[0].path", "'module:function'"]),
    # ---- precision ---------------------------------------------------------------------
    Case("bf16_weights_fp32_optimizer", ["model.dtype=bfloat16"], ["model.dtype", "learner.bf16: true", "model.dtype: float32"]),
    Case("fp16_weights_fp32_optimizer", ["model.dtype=float16"], ["model.dtype", "learner.bf16: true", "master copy"]),
    Case("bad_dtype", ["model.dtype=float8"], ["model.dtype", "use one of float32, bfloat16, float16"]),
    # ---- topology ----------------------------------------------------------------------
    Case("colocate_unknown_role", ["rollout.placement.colocate_with=critic"], ["generator.placement.colocate_with", "'critic'"]),
    Case("bad_strategy", ["rollout.placement.strategy=EVERYWHERE"], ["rollout.placement.strategy", "STRICT_SPREAD"]),
    Case("actor_class_missing", ["reward.actor_class=no_such_mod:Scorer"], ["reward.actor_class", "no_such_mod:Scorer", "module:Class"]),
    # ---- datasets ----------------------------------------------------------------------
    Case("dataset_missing", ["data.train={tmp}/nope.jsonl"], ["data.train", "nope.jsonl", "does not exist"]),
    Case("dataset_bad_json", ["data.train={tmp}/t.jsonl"], ["data.train", "t.jsonl:2", "not valid JSON"], files={"t.jsonl": GOOD + '{"prompt": "2+2=", \n'}),
    Case("dataset_no_prompt_key", ["data.train={tmp}/t.jsonl"], ["t.jsonl:1", "no 'prompt' key", "data.prompt_key"], files={"t.jsonl": '{"question": "1+2="}\n'}),
    Case("dataset_empty", ["data.train={tmp}/t.jsonl"], ["data.train", "has no prompts"], files={"t.jsonl": "\n"}),
    Case("dataset_prompt_not_text", ["data.train={tmp}/t.jsonl"], ["t.jsonl:1", "non-empty string or a list"], files={"t.jsonl": '{"prompt": 5}\n'}),
    Case("dataset_line_not_object", ["data.train={tmp}/t.jsonl"], ["t.jsonl:1", "must be a JSON object"], files={"t.jsonl": "[1, 2]\n"}),
    Case("dataset_columns_differ", ["data.train={tmp}/t.jsonl"], ["t.jsonl:2", "every line needs the same keys"], files={"t.jsonl": GOOD + '{"prompt": "x"}\n'}),
    Case("prompt_too_long", ["data.train={tmp}/t.jsonl", "data.max_prompt_tokens=4"], ["data.train", "t.jsonl:1", "longer than data.max_prompt_tokens = 4", "data.truncation: left"], files={"t.jsonl": GOOD}),
    Case("eval_dataset_bad", ["data.eval={tmp}/e.jsonl"], ["data.eval", "e.jsonl:1", "not valid JSON"], files={"e.jsonl": "{oops\n"}),
    # ---- model paths and tokenizers ------------------------------------------------------
    Case("model_missing", ["model.path={tmp}/no-model"], ["model.path", "no-model", "does not exist"]),
    Case("model_without_config", ["model.path={tmp}"], ["model.path", "no config.json", "save_pretrained"]),
    Case("model_path_is_file", ["model.path={tmp}/config.yaml"], ["model.path", "is a file"]),
    Case("tokenizer_missing", ["model.tokenizer=./no-tok"], ["model.tokenizer", "does not exist"]),
    Case("chat_prompts_no_template", ["model.path={nochat}", "data.train={tmp}/t.jsonl", "data.eval=null"], ["model.path", "no chat template", "lists of messages", "model.tokenizer"], files={"t.jsonl": '{"prompt": [{"role": "user", "content": "1+2="}]}\n'}),
    Case("chat_flag_no_template", ["model.path={nochat}", "model.chat_template=true"], ["model.path", "no chat template", "model.chat_template is on"]),
    # ---- reward functions, before Ray ---------------------------------------------------
    Case("reward_module_missing", [REWARD.format("no_such_module:fn")], ["reward.rewards[0].path", "no_such_module:fn", "cannot import module 'no_such_module'", "looked in the working directory {tmp}", "PYTHONPATH"]),
    Case("reward_module_broken", [REWARD.format("broken_reward:fn")], ["reward.rewards[0].path", "importing module 'broken_reward' raised RuntimeError: boom"], files={"broken_reward.py": "raise RuntimeError('boom')\n"}),
    Case("reward_function_missing", [REWARD.format("helpers.rewards:nope")], ["reward.rewards[0].path", "has no function 'nope'"]),
    Case("reward_not_callable", [REWARD.format("helpers.rewards:NOT_CALLABLE")], ["reward.rewards[0].path", "is a list, not a function"]),
    Case("math_answer_column_missing", ["reward.rewards=[{type: math, answer_key: solution}]"], ["reward.rewards[0].answer_key", "'solution'", "set answer_key"]),
    Case("reward_bad_signature", [REWARD.format("helpers.rewards:completions_only")], ["reward.rewards[0].path", "helpers.rewards:completions_only", "def completions_only(completions, **kwargs)", "completion_ids"]),
    # ---- cluster -----------------------------------------------------------------------
    Case("zero_group_size", ["rollout.n_samples=0"], ["rollout.n_samples: must be > 0"]),
    Case("zero_critic_ranks", ["algorithm.name=ppo", "critic.world_size=0"], ["critic.world_size: must be > 0"]),
    Case("negative_lr", ["learner.lr=-1e-5"], ["learner.lr: must be > 0"]),
    Case("zero_timeout", ["sync.timeout_s=0"], ["sync.timeout_s: must be > 0"]),
    Case("ray_address_unreachable", ["run.ray_address=127.0.0.2:1"], ["run.ray_address", "127.0.0.2:1", "ray start --head"]),
    # ---- in the actors: the embedded Ray instance starts --------------------------------
    Case("reward_raises", [REWARD.format("helpers.rewards:raises")], ["helpers.rewards:raises", "ValueError: bad reward input", "fix the function"], ray=True),
    Case("reward_nan", [REWARD.format("helpers.rewards:returns_nan")], ["helpers.rewards:returns_nan", "non-finite", "reward.on_nonfinite"], ray=True, full=True),
    Case("reward_wrong_length", [REWARD.format("helpers.rewards:wrong_length")], ["helpers.rewards:wrong_length", "returned 1 values for", "one finite float per completion"], ray=True, full=True),
    Case("reward_strings", [REWARD.format("helpers.rewards:returns_strings")], ["helpers.rewards:returns_strings", "list of numbers", "one finite float per completion"], ray=True, full=True),
    Case("reward_hangs", [REWARD.format("helpers.rewards:hangs"), "reward.timeout_s=5"], ["'hangs'", "did not return within 5s", "reward.timeout_s"], ray=True, full=True),
    Case("unplaceable_gpu", ["rollout.resources.num_gpus=1", "run.placement_timeout_s=3"], ["generator", "GPU", "run.placement_timeout_s", "Lower the per-role resources"], ray=True),
]  # fmt: skip


@pytest.fixture(scope="session")
def no_chat_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model with its tokenizer's chat template removed."""
    path = tmp_path_factory.mktemp("tiny-no-chat") / "model"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tc = path / "tokenizer_config.json"
    conf = json.loads(tc.read_text())
    conf.pop("chat_template", None)
    tc.write_text(json.dumps(conf))
    return str(path)


def _base_config(model: str, out: str) -> dict:
    """One generator, one reward actor, no reference: the fewest actors that fail."""
    return small_config(
        model,
        out,
        rollout={"num_actors": 1},
        reward={"num_actors": 1},
        algorithm={"name": "grpo", "kl_coef": 0.0},
        data={
            "train": str(REPO / "configs/data/arith_train.jsonl"),
            "eval": str(REPO / "configs/data/arith_eval.jsonl"),
            "eval_limit": 4,
        },
    )


def _marked(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``marker``."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.full] if c.full else []) for c in CASES]
)
def test_bad_input_exits_2_with_one_clear_message(case, tiny_model, no_chat_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(_base_config(tiny_model, str(tmp_path / "out")))
    )
    for name, text in case.files.items():
        (run_dir / name).write_text(text)
    subs = {"tmp": str(run_dir), "model": tiny_model, "nochat": no_chat_model}
    overrides = [o.format(**subs) if "{" in o and "[" not in o else o for o in case.overrides]
    marker = f"RLALIGN_BAD_INPUT_{uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
        "RLALIGN_BAD_INPUT_MARKER": marker,
        "RAY_ADDRESS": "",
    }
    cmd = [sys.executable, "-m", "rlalign_ray.cli", "train", case.config, *overrides]
    limit = LIMIT_S * (2 if case.ray else 1)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=run_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{case.id}: still running after {limit}s\n{err[-3000:]}")
    finally:
        left = _wait_gone(marker, 15.0)
        for pid in left:  # every marked process descends from the command
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    elapsed = time.monotonic() - start
    text = out + err
    assert proc.returncode == 2, f"exit {proc.returncode}\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    assert err.count("rlalign-ray: error:") == 1, err[-4000:]
    message = err[err.index("rlalign-ray: error:") :]
    for want in case.expect:
        want = want.replace("{tmp}", str(run_dir))
        assert want in message, f"{want!r} not in:\n{message}"
    assert not left, f"processes left running: {left}"
    assert not (tmp_path / "out").exists(), "a run that trained nothing left its output folder"
    assert elapsed < limit


def _wait_gone(marker: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = _marked(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
