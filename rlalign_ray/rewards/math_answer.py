"""The math answer reward (``type: math``): the reply's final answer against the dataset's,
compared by value with the ``math-verify`` library (``pip install 'rlalign-ray[math]'``).

1. **The reply's answer.** Thinking is skipped: text up to the last ``</think>``, or from an
   unclosed ``<think>`` on. Then the answer is the content of the last ``\\boxed{...}``
   (nested braces allowed), else what follows the last ``####`` (GSM8K's form), else the
   last number in the text (``-3``, ``1,234``, ``2.5``, ``3/4``, ``\\frac{3}{4}``).
   Units written as words after a number (``72 dollars``) are dropped.
2. **The gold answer**, from the dataset column ``answer_key``: what follows ``####`` when
   there is one (a GSM8K solution), else the last ``\\boxed{}``, else the whole value.
3. **Equivalence** by value, as math-verify decides it: ``0.75`` = ``3/4`` =
   ``\\frac{3}{4}``, ``\\$72`` = ``72`` = ``72 \\text{ dollars}``, ``50\\%`` = ``0.5``,
   ``1,234`` = ``1234``. The reward is 1.0 or 0.0; None (no reward for the sample: see
   ``reward.on_nonfinite``) where the gold answer cannot be read.
4. **Format**: a second component, ``<name>_format`` with weight ``format_weight``: 1.0
   where the final answer is given in the requested form (``\\boxed{}`` or ``####``),
   else 0.0. Both components are logged (``train/reward/math``,
   ``train/reward/math_format``).

math-verify bounds its parsing and comparisons with ``signal.alarm``, which works only in
a process's main thread, and rewards run in the reward actor's worker threads. So the
checks run in a child process of the reward (``python -m rlalign_ray.rewards.math_answer``,
JSON lines over a pipe), where math-verify's own timeouts (5 s a parse or comparison) work; the
parent also stops waiting after 20 s per sample (a hang in C code, which no
signal interrupts), scores that sample 0 and starts a fresh child for the rest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

from rlalign_ray.errors import RewardError
from rlalign_ray.rewards.builtin import EOS_TEXTS

if TYPE_CHECKING:
    from rlalign_ray.config import RewardSpec
    from rlalign_ray.rewards.sources import RewardInputs

log = logging.getLogger(__name__)

BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
HASHES = re.compile(r"####\s*([^\n]*)")
NUMBER = re.compile(
    r"(?:(?<![\d)\]}])(?<![\d)\]}]\s)-\s?)?(?:"  # a minus sign, not "10 - 3"'s
    r"\\[dt]?frac\{\s*\d+\s*\}\{\s*\d+\s*\}"  # \frac{3}{4}
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # 1,234.5
    r"|\d+(?:\.\d+)?(?:\s?/\s?\d+)?"  # 12, 2.5, 3/4
    r"|\.\d+)"  # .5
)
UNIT_WORDS = re.compile(r"\s*((?:\\\$|\$)?\s*-?[\d.,/]+)\s+[A-Za-z][A-Za-z .]*")
FORMATS = ("boxed", "####")  # the forms the format component asks for
STARTUP_S = 180.0  # a fresh child imports sympy and math-verify
CHECK_TIMEOUT_S = 5  # math-verify's own limit on one parse or comparison (its default)


def answer_text(text: str) -> str:
    """``text`` without its thinking (``<think>...</think>``) and after any EOS text."""
    for eos in EOS_TEXTS:
        text = text.split(eos, 1)[0]
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced;
    ``\\boxed 5`` gives ``5``; None without one (or with an unclosed brace)."""
    starts = list(BOXED.finditer(text))
    if not starts:
        return None
    i = starts[-1].end()
    if i >= len(text) or text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_answer(text: str) -> tuple[str | None, str]:
    """``(answer, form)``: the reply's final answer and how it was given, ``boxed``,
    ``####`` or ``number`` (the last number in the text); ``(None, "")`` without one.

    >>> extract_answer("So the total is 18 apples. \\\\boxed{18}")
    ('18', 'boxed')
    >>> extract_answer("Natalia sold 48 + 24 = 72 clips.\\n#### 72")
    ('72', '####')
    >>> extract_answer("<think>maybe 17</think>It costs $1,234.50 in all.")
    ('1,234.50', 'number')
    """
    text = answer_text(text)
    boxed = last_boxed(text)
    if boxed:
        return _clean(boxed), "boxed"
    hashes = HASHES.findall(text)
    if hashes and hashes[-1].strip():
        return _clean(hashes[-1]), "####"
    numbers = NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(" ", ""), "number"
    return None, ""


def gold_answer(value: Any) -> str:
    """The answer in a dataset's gold value: after ``####`` (a GSM8K solution), else the
    last ``\\boxed{}``, else the whole value."""
    text = str(value)
    if "####" in text:
        return _clean(text.rsplit("####", 1)[1])
    return _clean(last_boxed(text) or text)


def _clean(answer: str) -> str:
    """Trailing punctuation and unit words (``72 dollars.`` -> ``72``) off an answer."""
    answer = answer.strip().rstrip(".").strip()
    m = UNIT_WORDS.fullmatch(answer)
    return m.group(1).strip() if m else answer


class MathVerifier:
    """math-verify in a child process (see the module's docstring): ``check([(answer,
    gold), ...])`` -> 1.0, 0.0 or None (gold unreadable) per pair; an answer of None is
    0.0. Works from any thread of the caller."""

    def __init__(self, timeout_s: int = CHECK_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.per_sample_s = 3 * timeout_s + 5  # the gold, the answer, the comparison
        self.child: _Child | None = None
        self.timeouts = 0  # samples scored 0 because the child did not answer in time

    def check(self, pairs: list[tuple[str | None, str]]) -> list[float | None]:
        out: list[float | None] = []
        while len(out) < len(pairs):
            if self.child is None:
                self.child = _Child(self.timeout_s)
            todo = pairs[len(out) :]
            self.child.send(todo)
            for _ in todo:
                line = self.child.read_line(self.per_sample_s)
                if not line:  # hung (or died): this sample scores 0, a new child does the rest
                    self.timeouts += 1
                    log.warning(
                        "math reward: no verdict within %ds on answer %.200r (gold %.200r); "
                        "scored 0", self.per_sample_s, *pairs[len(out)],
                    )  # fmt: skip
                    self.close()
                    out.append(0.0)
                    break
                out.append(json.loads(line))
        return out

    def close(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


class _Child:
    """``python -m rlalign_ray.rewards.math_answer``: JSON lines in, one verdict a line out."""

    def __init__(self, timeout_s: int):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(timeout_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.buf = b""
        weakref.finalize(self, _stop, self.proc)
        first = self.read_line(STARTUP_S)
        if first != '"ready"':
            self.stop()
            detail = json.loads(first).get("error", first) if first.startswith("{") else first
            raise RewardError(
                f"math reward: math-verify did not start ({detail or 'no answer'}); "
                "pip install 'rlalign-ray[math]' in every node's environment"
            )

    def send(self, pairs: list[tuple[str | None, str]]) -> None:
        try:
            self.proc.stdin.write(json.dumps(pairs).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # the child is gone: read_line finds no answer
            pass

    def read_line(self, timeout_s: float) -> str:
        """The next line within ``timeout_s``; "" when none came (hung or exited)."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the child exited
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode().strip()

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass


class MathReward:
    """``type: math``: 1.0 where the reply's final answer equals the ``answer_key`` column's
    by value (math-verify), else 0.0; see the module's docstring."""

    def __init__(self, spec: RewardSpec):
        self.name = spec.name or "math"
        self.path = f"math:{spec.answer_key}"
        self.key = spec.answer_key
        self.verifier = MathVerifier()

    def __call__(self, inputs: RewardInputs) -> list[float | None]:
        if self.key not in inputs.columns:
            raise RewardError(
                f"math reward {self.name!r} needs the dataset column {self.key!r} with the "
                f"gold answers (set answer_key); columns here: {sorted(inputs.columns)}"
            )
        golds = [gold_answer(g) if _given(g) else "" for g in inputs.columns[self.key]]
        answers = [extract_answer(t)[0] for t in inputs.completion_texts]
        return self.verifier.check(list(zip(answers, golds)))


class MathFormatReward:
    """The format component of ``type: math`` (``<name>_format``): 1.0 where the final
    answer is in ``\\boxed{}`` or after ``####``, else 0.0; None where the gold answer is
    missing, as for the correctness component."""

    def __init__(self, spec: RewardSpec):
        self.name = f"{spec.name or 'math'}_format"
        self.path = f"math_format:{spec.answer_key}"
        self.key = spec.answer_key

    def __call__(self, inputs: RewardInputs) -> list[float | None]:
        golds = inputs.columns.get(self.key) or [None] * len(inputs)
        out: list[float | None] = []
        for text, gold in zip(inputs.completion_texts, golds):
            if not _given(gold):
                out.append(None)
            else:
                out.append(1.0 if extract_answer(text)[1] in FORMATS else 0.0)
        return out


def _given(gold: Any) -> bool:
    """A gold answer is there (not None, not blank): else neither component applies."""
    return gold is not None and bool(str(gold).strip())


def _verdict(parse: Any, verify: Any, answer: str | None, gold: str, t: int, cache: dict) -> Any:
    """1.0 / 0.0 / None (the gold unreadable) for one pair, in the child."""
    if gold not in cache:
        if len(cache) > 4096:
            cache.clear()
        try:
            cache[gold] = parse(f"\\boxed{{{gold}}}", parsing_timeout=t) if gold else []
        except Exception:  # noqa: BLE001 - an unreadable gold answer
            cache[gold] = []
    if not cache[gold]:
        return None
    if not answer:
        return 0.0
    try:
        target = parse(f"\\boxed{{{answer}}}", parsing_timeout=t)
        return 1.0 if target and verify(cache[gold], target, timeout_seconds=t) else 0.0
    except Exception:  # noqa: BLE001 - a reply math-verify cannot read scores 0
        return 0.0


def _serve(timeout_s: int) -> None:
    """The child: a JSON list of ``[answer, gold]`` pairs per input line, one verdict per
    output line (``1.0``, ``0.0`` or ``null``); math-verify's timeouts (``signal.alarm``)
    work here, in the main thread."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(json.dumps("ready"), flush=True)
    cache: dict[str, list] = {}
    for line in sys.stdin:
        for answer, gold in json.loads(line):
            try:
                v = _verdict(parse, verify, answer, gold, timeout_s, cache)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - math-verify's TimeoutException
                v = 0.0
            print(json.dumps(v), flush=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else CHECK_TIMEOUT_S)
