"""The house rules of the package, checked on its source: imports go down the rooms of the
"Architecture" table in docs/internals.md only (never up, so no module-level cycle), at load
time and inside functions alike, but for the few deliberate lazy imports listed in
``LAZY_UP``; no file over 500 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rlalign_ray"
LAUNCH = PACKAGE.parent / "launch"
ROOMS = [  # docs/internals.md's Architecture table, top to bottom
    ["cli", "report", "config_doc", "metrics_doc", "bench"],
    ["trainers", "preflight"],
    ["topology"],
    ["pools"],
    ["rollout", "rewards", "learner"],
    ["envs"],
    ["sync"],
    ["runtime"],
    ["models"],
    ["data", "algorithms", "tasks"],
    ["ledger", "run_log", "log_backends", "checkpoint", "storage"],
    ["config"],
    ["roles"],
    ["errors"],
]
# Deprecated module aliases (each warns on import, for one release): the room each stands for.
ALIASES = {"trainer": "trainers", "logger": "run_log", "loggers": "log_backends"}
RANK = {room: i for i, rooms in enumerate(ROOMS) for room in rooms}
RANK.update({alias: RANK[room] for alias, room in ALIASES.items()})
# The imports inside a function that go up the rooms on purpose, (file, module): why.
LAZY_UP = {
    ("config/checks_algorithm.py", "rlalign_ray.algorithms"): "checks read the registries",
    ("config/tree.py", "rlalign_ray.algorithms"): "Config.needs_critic reads the estimators",
    ("config/tree.py", "rlalign_ray.algorithms.objective"): "Config.objective resolves them",
    ("config/checks.py", "rlalign_ray.rewards.types"): "check_reward reads the reward types",
    ("config/checks.py", "rlalign_ray.rollout.backends"): "_check_backend reads the backends",
    ("runtime/resources.py", "rlalign_ray.rollout.backends"): "a generator's memory: its backend",
    ("config/pools.py", "rlalign_ray.rewards.types"): "check_pools reads the reward types",
    ("models/tiny_eval.py", "rlalign_ray.rewards.builtin"): "the tiny model's accuracy",
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts[0]


def _imports(tree: ast.AST, in_function: bool = False):
    """``(module imported, in a function)`` for every import of ``rlalign_ray`` that runs
    (``if TYPE_CHECKING:`` blocks never do); ``from rlalign_ray import x`` imports
    ``rlalign_ray.x``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]), in_function)
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "rlalign_ray":
            for alias in node.names:
                yield f"rlalign_ray.{alias.name}", in_function
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlalign_ray."):
            yield node.module, in_function
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rlalign_ray."):
                    yield alias.name, in_function
        inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(node, in_function or inner)


def _upward() -> list[tuple[str, str, bool]]:
    """``(file, module, in a function)`` of every import that goes up the rooms."""
    up = []
    for path, room in _modules():
        if room == "__init__":
            continue
        for module, in_function in _imports(ast.parse(path.read_text())):
            target = module.split(".")[1]
            if target == "__version__" or RANK[target] >= RANK[room]:
                continue
            up.append((str(path.relative_to(PACKAGE)), module, in_function))
    return up


def test_every_room_is_in_the_table():
    rooms = {room for _, room in _modules() if room != "__init__"}
    assert rooms == set(RANK), sorted(rooms ^ set(RANK))


def test_imports_only_go_down_at_load_time_and_inside_functions():
    up = _upward()
    assert not [(f, m) for f, m, lazy in up if not lazy], "imported at load time"
    assert not [(f, m) for f, m, lazy in up if (f, m) not in LAZY_UP], "add to LAZY_UP, or fix"
    stale = set(LAZY_UP) - {(f, m) for f, m, _ in up}
    assert not stale, f"{stale} are no longer imported: drop them from LAZY_UP"


def test_the_package_itself_imports_nothing_at_load_time():
    """``import rlalign_ray`` is cheap (no torch, no Ray): its public API loads on access."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [m for m, in_function in _imports(tree) if not in_function]


def test_no_file_over_500_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for path in [*PACKAGE.rglob("*.py"), *LAUNCH.rglob("*.py")]:
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long_files.append(f"{path.name}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{path.name} {node.name}: {length}")
    assert not long_files and not long_functions, (long_files, long_functions)
