"""Reading the documentation's fenced code blocks and checking each kind (the rules are in
``tests/unit/test_docs.py``'s docstring)."""

from __future__ import annotations

import builtins
import contextlib
import io
import re
import shlex
import subprocess
import symtable
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGS = {"yaml", "python", "bash", "json", "text"}
MARKERS = {"yaml": {"yaml-only"}, "python": {"slow", "compile"}}
TRACKED = ("configs/", "launch/", "cluster/", "tests/", "rlalign_ray/", "docs/", ".ci/")
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
MARKER = re.compile(r"^<!-- docs-test: ([a-z-]+) -->$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str  # "" or the word of a <!-- docs-test: WORD --> line just before the fence
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(paths=DOCS) -> list[Block]:
    """Every fenced code block of ``paths``, in order."""
    out = []
    for path in paths:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(m.group(1)))
            before = next((x for x in reversed(lines[:i]) if x.strip()), "")
            mark = MARKER.match(before.strip())
            body = "\n".join(lines[i + 1 : end]) + "\n"
            out.append(Block(path, i + 1, m.group(2), mark.group(1) if mark else "", body))
            i = end + 1
    return out


# ---- yaml --------------------------------------------------------------------------------
def yaml_config_problems(block: Block) -> list[str]:
    """Load a YAML block as a config (see the rule); the problems that remain once those
    about optional packages not installed here are left out."""
    from rlalign_ray.config import load_config
    from rlalign_ray.errors import ConfigError

    raw = yaml.safe_load(block.text)
    if not isinstance(raw, dict):
        return [f"not a mapping of config sections: {type(raw).__name__}"]
    if "base" in raw:
        raw["base"] = str(REPO / "configs" / raw["base"])
    elif not {"model", "data", "reward"} <= set(raw):
        raw["base"] = str(REPO / "configs" / "demo_cpu.yaml")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(raw, f)
        f.flush()
        try:
            load_config(f.name)
        except ConfigError as e:
            return [p for p in e.problems if not _optional_missing(p)]
    return []


def _optional_missing(problem: str) -> bool:
    return "is not installed" in problem or "needs peft" in problem


# ---- bash --------------------------------------------------------------------------------
def commands(text: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped,
    ``&&`` / ``;`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words: list[str] = []
        for w in shlex.split(line, comments=True):
            if w in ("&&", ";", "||"):
                out.append(words)
                words = []
            else:
                words.append(w)
        out.append(words)
    return [c for c in out if c]


@cache
def extras() -> frozenset[str]:
    """The extras ``pyproject.toml`` defines (read without tomllib, which Python 3.10 lacks)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return frozenset(re.findall(r"^([\w-]+) = \[", section, re.M))


EXTRA = re.compile(r"^(?:\.|rlalign-ray)\[([\w,-]+)\]$")


def _check_pip(args: list[str]) -> list[str]:
    if args[:1] != ["install"]:
        return [f"pip {' '.join(args)}: only pip install is expected"]
    problems = []
    for a in args[1:]:
        m = EXTRA.match(a)
        for name in m.group(1).split(",") if m else []:
            if name not in extras():
                problems.append(f"pip install {a}: no extra {name!r} in pyproject.toml")
    return problems


@cache
def _script_problems(path: str) -> tuple[str, ...]:
    script = REPO / path
    if not script.is_file():
        return (f"{path}: no such script",)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    return (f"{path}: bash -n: {proc.stderr.strip()}",) if proc.returncode else ()


def _check_cli(args: list[str]) -> list[str]:
    from rlalign_ray.cli import _parse
    from rlalign_ray.config import load_config
    from rlalign_ray.errors import ConfigError

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns = _parse(args)
    except SystemExit:
        return [f"rlalign-ray {' '.join(args)}: the argument parser refuses it"]
    if getattr(ns, "config", None) is None:
        return []
    try:
        load_config(ns.config, getattr(ns, "overrides", None) or [])
    except ConfigError as e:
        return [
            f"rlalign-ray {' '.join(args)}: {p}" for p in e.problems if not _optional_missing(p)
        ]
    return []


def _paths(words: list[str]) -> list[str]:
    """Repository paths a command names (also as ``key=PATH``) that do not exist."""
    missing = []
    for w in words:
        value = w.split("=", 1)[1] if "=" in w and not w.startswith("-") else w
        if value.startswith(TRACKED) and not (REPO / value.rstrip("/")).exists():
            missing.append(f"{value}: no such file in the repository")
    return missing


def check_command(words: list[str], env: dict[str, str]) -> list[str]:
    """Problems of one command (see the rule in tests/unit/test_docs.py)."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value cmd ...
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        return []
    cmd, args = words[0], words[1:]
    problems = _paths(words)
    if cmd == "export":
        env.update(a.split("=", 1) for a in args if "=" in a)
    elif cmd == "rlalign-ray":
        problems += _check_cli(args)
    elif cmd == "pip":
        problems += _check_pip(args)
    elif cmd == "bash" or cmd.endswith(".sh"):
        script = args[0] if cmd == "bash" else cmd
        problems += list(_script_problems(script))
    elif cmd == "python":
        problems += _check_python_command(args)
    elif cmd == "ray":
        problems += _check_ray(args, env)
    elif cmd not in KNOWN:
        problems.append(f"{cmd}: a command the docs test does not know; add a rule for it")
    return problems


# other commands a block may run: their file arguments are checked by _paths only
KNOWN = {
    "tensorboard", "mlflow", "wandb", "mkdocs", "kubectl", "sbatch", "eval", "cd", "git",
    "mkdir", "echo", "aws",
}  # fmt: skip


def _check_python_command(args: list[str]) -> list[str]:
    if args[:2] == ["-m", "pytest"] or args[:2] == ["-m", "mkdocs"]:
        return []
    if args and args[0].endswith(".py"):
        return [] if (REPO / args[0]).is_file() else [f"{args[0]}: no such script"]
    return [f"python {' '.join(args)}: only scripts, -m pytest and -m mkdocs are expected"]


def _check_ray(args: list[str], env: dict[str, str]) -> list[str]:
    if args[:2] != ["job", "submit"]:
        return []
    problems = []
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("ray job submit: set RAY_AUTH_MODE=token (Ray 2.60 token auth)")
    if "--" in args:
        inner = args[args.index("--") + 1 :]
        problems += check_command(list(inner), env)
    return problems


def bash_problems(block: Block) -> list[str]:
    env: dict[str, str] = {}
    return [p for words in commands(block.text) for p in check_command(list(words), env)]


# ---- python ------------------------------------------------------------------------------
def undefined_names(block: Block) -> list[str]:
    """Global names the block uses but never defines or imports (a static check, so that
    blocks only compiled or import-checked cannot use a class they never define)."""
    top = symtable.symtable(block.text, block.id, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for sym in table.get_symbols():
            if sym.is_referenced() and (sym.is_global() or table is top):
                used.add(sym.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return sorted(used - defined - set(dir(builtins)) - {"__name__", "__file__"})


RUNNER = """
import ast, json, sys, traceback
failed = []
for snip in json.load(open(sys.argv[1])):
    tree = ast.parse(snip["code"], snip["id"])
    if snip["mode"] == "imports":  # only the imports, to check they resolve
        tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    try:
        exec(compile(tree, snip["id"], "exec"), {"__name__": "__main__"})
    except BaseException:
        failed.append(snip["id"] + "\\n" + traceback.format_exc(limit=3))
print(json.dumps(failed))
"""
