"""Built-in environments: a calculator tool and a number-guessing game.

``CalculatorEnv`` (tool calling): the model writes ``<expression>`` to call the
calculator, which answers ``=value `` (an observation the model does not train on); any
action without a ``<`` is the final answer, rewarded 1.0 when it equals the row's
``answer`` column. Expressions are evaluated by ``safe_eval``: integer and float
arithmetic over a parsed syntax tree (no names, calls or attributes), with bounds on the
expression's length and the size of powers, so a model cannot run code or exhaust memory.

``GuessNumberEnv`` (a text game): guess a secret integer; each wrong guess is answered
``higher`` or ``lower``; a right guess ends the episode with reward 1.0.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any

from rlalign_ray.envs.base import Env, StepResult

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class EvalError(ValueError):
    """An expression the calculator refuses (bad syntax, a name, too large)."""


def safe_eval(expr: str, max_len: int = 200, max_abs: float = 1e12) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses.

    No names, calls, attributes or containers are accepted (it never runs code); powers
    are capped so that no intermediate value exceeds ``max_abs`` (time and memory stay
    small), and expressions longer than ``max_len`` characters are refused.

    >>> safe_eval("12+34*2")
    80
    >>> safe_eval("(7-9)**2/4")
    1.0
    >>> safe_eval("__import__('os')")
    Traceback (most recent call last):
    ...
    rlalign_ray.envs.builtin.EvalError: not arithmetic: Call
    """
    if len(expr) > max_len:
        raise EvalError(f"expression longer than {max_len} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise EvalError("syntax error") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (
                abs(right) > 64 or abs(left) > 1 and abs(right) * _log2(abs(left)) > 40
            ):
                raise EvalError("power too large")
            try:
                value = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise EvalError("division by zero") from None
            if isinstance(value, complex) or abs(value) > max_abs:
                raise EvalError("value out of range")
            return value
        raise EvalError(f"not arithmetic: {type(node).__name__}")

    return ev(tree)


def _log2(x: float) -> float:
    import math

    return math.log2(x)


def format_number(x: int | float) -> str:
    """Integers (and integral floats) without a decimal point; others to 6 digits."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(x) if isinstance(x, int) else f"{x:.6g}"


class CalculatorEnv(Env):
    """Tool calling: ``<expr>`` calls the calculator, any other action is the answer.

    kwargs: ``answer_key`` (the dataset column with the answer), ``max_calls`` (tool calls
    allowed before the episode is truncated), ``call_reward`` (reward per successful tool
    call, 0 by default), ``open`` / ``close`` (the call's delimiters; use ``close`` as the
    stop string, ``env.stop``).
    """

    def __init__(
        self,
        answer_key: str = "answer",
        max_calls: int = 4,
        call_reward: float = 0.0,
        open: str = "<",
        close: str = ">",
    ):
        self.answer_key, self.max_calls, self.call_reward = answer_key, max_calls, call_reward
        self.call_open, self.call_close = open, close
        self.answer, self.calls = "", 0

    def reset(self, item: Any) -> str:
        self.answer = str(item.columns.get(self.answer_key, "")).strip()
        self.calls = 0
        return item.prompt

    def step(self, action: str) -> StepResult:
        start = action.find(self.call_open)
        if start < 0:  # the final answer
            right = action.strip() == self.answer
            return StepResult("", float(right), terminated=True, info={"answer": action})
        self.calls += 1
        expr = action[start + len(self.call_open) :].split(self.call_close, 1)[0]
        try:
            obs, ok = "=" + format_number(safe_eval(expr)) + " ", True
        except EvalError as e:
            obs, ok = f"=error: {e} ", False
        return StepResult(
            obs,
            self.call_reward if ok else 0.0,
            truncated=self.calls >= self.max_calls,
            info={"call": expr},
        )


class GuessNumberEnv(Env):
    """Guess a secret integer in ``[lo, hi]`` (drawn from the episode's seed, or the row's
    ``secret`` column): ``higher`` / ``lower`` after a wrong guess, reward 1.0 and the end
    when right; an action that is not a number is answered ``a number please``."""

    def __init__(self, lo: int = 1, hi: int = 16, seed: int | None = None):
        self.lo, self.hi, self.rng = lo, hi, random.Random(seed)
        self.secret = lo

    def reset(self, item: Any) -> str:
        secret = item.columns.get("secret")
        self.secret = int(secret) if secret is not None else self.rng.randint(self.lo, self.hi)
        return item.prompt

    def step(self, action: str) -> StepResult:
        m = re.search(r"-?\d+", action)
        if m is None:
            return StepResult(" a number please\n")
        guess = int(m.group())
        if guess == self.secret:
            return StepResult("", 1.0, terminated=True)
        return StepResult(" higher\n" if guess < self.secret else " lower\n")
