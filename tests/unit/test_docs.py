"""The documentation (``README.md`` and ``docs/``) builds, agrees with the code, and every
fenced code block in it is run or loaded. The rule, per block language:

- ``yaml``: a config. A block with ``base: NAME`` (resolved in ``configs/``), or with
  ``model``, ``data`` and ``reward`` sections, loads on its own; any other block is a
  fragment merged onto ``configs/demo_cpu.yaml``. It must load and validate through
  ``rlalign_ray.config.load_config`` (problems that only say an optional package such as
  vLLM or peft is not installed are ignored). YAML that is not a config carries
  ``<!-- docs-test: yaml-only -->`` on the line before the fence and is only parsed.
- ``json``: parses as JSON, or as JSON lines.
- ``python``: run from the repository root in one subprocess, each block in a fresh
  namespace. ``<!-- docs-test: slow -->`` (the block starts Ray or trains): the default tier
  runs only its imports, the full tier (``RLALIGN_FULL_TESTS=1``) runs all of it, a process
  each. ``<!-- docs-test: compile -->`` (code of another library, e.g. a TRL script): only
  compiled.
- ``bash``: every command (continuation lines joined, comments dropped, ``&&`` and ``;``
  split, leading ``VAR=value`` and ``export`` recorded): ``rlalign-ray ...`` parses with the
  real argument parser (``rlalign_ray.cli.build_parser``) and its config with its overrides
  loads and validates; ``pip install`` names only extras that ``pyproject.toml`` defines;
  ``bash SCRIPT`` / ``*.sh`` exists and passes ``bash -n``; ``python SCRIPT.py`` exists;
  ``ray job submit`` has ``RAY_AUTH_MODE=token`` set in the block and its command after
  ``--`` follows these rules; any word naming a path under ``configs/``, ``launch/``,
  ``cluster/``, ``tests/``, ``rlalign_ray/``, ``docs/`` or ``.ci/`` (also as
  ``key=PATH``) must exist; any other command must be in ``doc_snippets.KNOWN``.
- ``text``: not checked (output, diagrams, formulas). Any other language is an error.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers.doc_snippets import (
    DOCS,
    LANGS,
    MARKERS,
    REPO,
    RUNNER,
    Block,
    bash_problems,
    blocks,
    undefined_names,
    yaml_config_problems,
)

BLOCKS = blocks()
QUICK_START = [
    "pip install torch==2.13.0 && pip install -e . && rlalign-ray train configs/demo_cpu.yaml",
    'pip install torch==2.13.0 && pip install -e ".[test]" && bash launch/install_vllm.sh'
    " && python -m pytest -q",
]


def _of(lang: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang]


def _env() -> dict[str, str]:
    path = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p
    )
    return {**os.environ, "PYTHONPATH": path, "NO_MKDOCS_2_WARNING": "1"}


def _python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root, with this checkout first on the path."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_site_builds_strictly(tmp_path):
    """Broken links, missing anchors and pages left out of the nav all fail the build."""
    proc = _python("-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_generated_reference_is_current():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import gen_reference
    finally:
        sys.path.remove(str(REPO / "docs"))
    stale = [
        str(path.relative_to(REPO))
        for path, text in gen_reference.render().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"{stale} are stale: run python docs/gen_reference.py"


def test_every_block_has_a_known_language_and_marker():
    bad = [f"{b.id}: ```{b.lang}" for b in BLOCKS if b.lang not in LANGS]
    bad += [
        f"{b.id}: marker {b.marker!r}"
        for b in BLOCKS
        if b.marker and b.marker not in MARKERS.get(b.lang, ())
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("block", _of("yaml"), ids=lambda b: b.id)
def test_yaml_blocks_are_configs_that_load(block):
    if block.marker == "yaml-only":
        yaml.safe_load(block.text)
        return
    assert not yaml_config_problems(block)


def test_json_blocks_parse():
    for b in _of("json"):
        try:
            json.loads(b.text)
        except json.JSONDecodeError:
            [json.loads(line) for line in b.text.splitlines() if line.strip()]


@pytest.mark.parametrize("block", _of("bash"), ids=lambda b: b.id)
def test_bash_commands_parse_and_their_configs_load(block):
    assert not bash_problems(block)


def test_python_blocks_run():
    """The blocks that do not start Ray run; the slow ones' imports resolve; all compile."""
    snippets = []
    for b in _of("python"):
        compile(b.text, b.id, "exec")
        assert not undefined_names(b), (b.id, undefined_names(b))
        if b.marker != "compile":
            snippets.append({"id": b.id, "code": b.text, "mode": "imports" if b.marker else "run"})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "snippets.json").write_text(json.dumps(snippets))
        (Path(tmp) / "runner.py").write_text(RUNNER)
        proc = _python(str(Path(tmp) / "runner.py"), str(Path(tmp) / "snippets.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(failed)


@pytest.mark.integration
@pytest.mark.full
@pytest.mark.slow
@pytest.mark.parametrize(
    "block", [b for b in _of("python") if b.marker == "slow"], ids=lambda b: b.id
)
def test_slow_python_blocks_run(block, no_ray, tmp_path):
    """The blocks that start Ray, each in a process of its own (an embedded instance)."""
    script = tmp_path / "snippet.py"
    script.write_text(block.text)
    proc = _python(str(script), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_the_quick_start_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    quickstart = (REPO / "docs/quickstart.md").read_text()
    for command in QUICK_START:
        assert f"```bash\n{command}\n```" in readme, command
        assert f"```bash\n{command}\n```" in quickstart, command
    ci = [
        x
        for x in (REPO / ".ci/run").read_text().splitlines()
        if x and not x.startswith(("#", "set ", "cd ", "export "))
    ]
    assert ci == [QUICK_START[1]]
    assert QUICK_START[1] in (REPO / "docs/contributing.md").read_text()


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    missing = [x for x in links if "://" not in x and not (REPO / x).exists()]
    assert not missing and len(links) > 10, missing


def test_the_architecture_table_is_the_rooms_the_tests_enforce():
    from unit.test_architecture import ROOMS

    text = (REPO / "docs/internals.md").read_text().split("## Architecture", 1)[1]
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    rooms = [[re.sub(r"(\.py|/)$", "", n) for n in re.findall(r"`([^`]+)`", row)] for row in rows]
    assert rooms == ROOMS


def test_the_transport_table_lists_every_transport():
    from rlalign_ray.config import TRANSPORTS

    text = (REPO / "docs/internals.md").read_text().split("`sync.transport`:", 1)[1]
    table = text.split("\n\n", 2)[1]
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert sorted(rows) == sorted(
        f"`{t}`" + (" (default)" if t == "auto" else "") for t in TRANSPORTS
    )


def test_install_hints_name_extras_that_exist():
    """``pip install 'rlalign-ray[X]'`` / ``".[X]"`` in the code, scripts and docs."""
    from helpers.doc_snippets import extras

    files = [
        *REPO.glob("rlalign_ray/**/*.py"),
        *REPO.glob("launch/**/*"),
        *DOCS,
        REPO / "cluster/README.md",
    ]
    named = {
        (f.relative_to(REPO), m)
        for f in files
        if f.is_file()
        for m in re.findall(r"(?:rlalign-ray|\.)\[([\w-]+)\]", f.read_text(errors="ignore"))
    }
    assert not [(f, m) for f, m in named if m not in extras()]
    assert named


# ---- metrics ------------------------------------------------------------------------------
PREFIXES = ("train", "eval", "time", "rollout", "reward", "weights", "data", "run", "critic")


def test_the_recorded_run_logs_only_documented_metrics():
    from rlalign_ray.metrics_doc import undocumented

    rows = json.loads((REPO / "tests/data/sync_k0_metrics.json").read_text())
    assert not undocumented(k for r in rows for k in r)


def _string_literals(paths) -> set[str]:
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def test_metric_names_in_the_code_are_documented():
    """Whole metric names written in the trainer and the pools, and the statistics the
    learner and critic ranks return (logged as ``train/NAME`` and ``critic/NAME``)."""
    from rlalign_ray.metrics_doc import undocumented

    code = [
        p
        for p in (REPO / "rlalign_ray").rglob("*.py")
        if "bench" not in p.parts and p.name != "metrics_doc.py"
    ]
    names = {
        s for s in _string_literals(code) if re.fullmatch(rf"({'|'.join(PREFIXES)})/[a-z_@]+", s)
    }
    ranks = {
        "train": ["learner/learner.py", "learner/base.py"],
        "critic": ["learner/critic.py"],
    }
    for prefix, files in ranks.items():
        for f in files:
            text = (REPO / "rlalign_ray" / f).read_text()
            keys = re.findall(r'(?:stats|logs)\["(\w+)"\]', text)
            keys += re.findall(r'logs = \{"(\w+)"', text)
            keys += [
                k
                for t in re.findall(r"for key in \(([^)]*)\)", text)
                for k in re.findall(r'"(\w+)"', t)
            ]
            names |= {f"{prefix}/{k}" for k in keys}
    assert len(names) > 30
    assert not undocumented(names)


def _stem(name: str) -> str:
    """The part of a metric's name the code writes literally (``data/eval_...`` names are
    the training ones with ``eval_`` put in)."""
    return re.sub(r"<[a-z]+>", "", name.split("/")[-1]).removeprefix("eval_")


def test_every_documented_metric_is_still_written_somewhere():
    from rlalign_ray.metrics_doc import METRICS

    code = [p for p in (REPO / "rlalign_ray").rglob("*.py") if p.name != "metrics_doc.py"]
    text = "\n".join(p.read_text() for p in code)
    gone = [name for name, _, _ in METRICS if _stem(name) not in text]
    assert not gone
