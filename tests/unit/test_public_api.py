"""The public Python API is ``rlalign_ray.API``, the one list of it: every name imports from
its module and from the package; the docs' Python blocks and ``launch/examples/`` import
only listed names, from their listed modules; the old module paths that moved warn and
still work."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest
from helpers.doc_snippets import REPO, blocks

import rlalign_ray

ALIASES = {  # old path -> (the module it is now, a name that must import through the old one)
    "rlalign_ray.trainer": ("rlalign_ray.trainers.trainer", "Trainer"),
    "rlalign_ray.logger": ("rlalign_ray.run_log", "MetricsLogger"),
    "rlalign_ray.loggers": ("rlalign_ray.log_backends", "JsonlBackend"),
    "rlalign_ray.sync.weights": ("rlalign_ray.sync.transports", "WeightTransport"),
    "rlalign_ray.runtime.pools": ("rlalign_ray.runtime.placement", "get"),
}


def test_every_public_name_imports_from_its_module_and_from_the_package():
    names = [n for names in rlalign_ray.API.values() for n in names]
    assert len(names) == len(set(names)), "a name listed twice"
    assert rlalign_ray.__all__ == sorted(names)
    for module, listed in rlalign_ray.API.items():
        mod = importlib.import_module(module)
        for name in listed:
            assert getattr(rlalign_ray, name) is getattr(mod, name), (module, name)
    with pytest.raises(AttributeError):
        rlalign_ray.no_such_name  # noqa: B018


def _imported(tree: ast.AST) -> list[tuple[str, str]]:
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlalign_ray")
        for alias in node.names
    ]


def test_the_docs_and_the_examples_use_only_the_public_api():
    trees = {b.id: ast.parse(b.text) for b in blocks() if b.lang == "python"}
    for path in sorted((REPO / "launch/examples").glob("*.py")):
        trees[str(path.relative_to(REPO))] = ast.parse(path.read_text())
    used = {(where, module, name) for where, t in trees.items() for module, name in _imported(t)}
    assert any(where.startswith("docs/guides/python-api.md") for where, _, _ in used)
    private = [
        f"{where}: from {module} import {name}"
        for where, module, name in sorted(used)
        if name not in rlalign_ray.API.get(module, ())
    ]
    assert not private, "not in rlalign_ray.API:\n" + "\n".join(private)


def test_import_rlalign_ray_loads_neither_torch_nor_ray():
    code = "import sys, rlalign_ray; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_a_moved_module_warns_and_still_imports(old):
    new, name = ALIASES[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import rlalign_ray"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_generator_pools_old_score_methods_and_experience_shards_warn():
    """Scores are a handle on the chunk now (``chunk.scored``, ``GeneratorPool.scores``) and
    a step's batches a ``StepBatches``: the old names answer for a release, with a warning."""
    from rlalign_ray.data.batch import PromptItem
    from rlalign_ray.data.step_batches import StepBatches
    from rlalign_ray.pools import Chunk, Experience, GeneratorPool

    pool = GeneratorPool.__new__(GeneratorPool)  # no actors needed for these
    chunk = Chunk(0, [PromptItem(index=0, prompt="p")], 2)
    with pytest.warns(DeprecationWarning, match=r"prescored\(chunk\) is deprecated"):
        assert pool.prescored(chunk) is None
    with pytest.warns(DeprecationWarning, match=r"joined_scores\(chunks, what\) is deprecated"):
        assert pool.joined_scores([chunk], "reward pool") is None
    exp = Experience(["ref-a", "ref-b"], None, None, None)
    assert exp.batches == StepBatches(["ref-a", "ref-b"]) and exp.batch_refs(1) == [
        "ref-a",
        "ref-b",
    ]
    assert exp.batches.layout().open(["a", "b", "lp"]) == (["a", "b"], ["lp"])
    with pytest.warns(DeprecationWarning, match="Experience.shards is deprecated"):
        assert exp.shards == ["ref-a", "ref-b"]
