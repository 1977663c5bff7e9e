"""The house rules of the package, checked on its source: imports go down the rooms of
the "Architecture" table in docs/internals.md only (never up, so no module-level cycle), no file over 500
lines, no function over 60."""

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
RANK = {room: i for i, rooms in enumerate(ROOMS) for room in rooms}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts[0]


def test_every_room_is_in_the_table():
    rooms = {room for _, room in _modules() if room != "__init__"}
    assert rooms == set(RANK), sorted(rooms ^ set(RANK))


def test_imports_at_load_time_only_go_down():
    up = []
    for path, room in _modules():
        if room == "__init__":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlalign_ray."):
                target = node.module.split(".")[1]
                if RANK[target] < RANK[room]:
                    up.append(f"{path.relative_to(PACKAGE)} imports {node.module}")
    assert not up, "\n".join(up)


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
