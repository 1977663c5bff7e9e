"""``builtin:<name>`` model paths, built locally on first use and cached.

``resolve_model_path("builtin:tiny-arith")`` returns
``<cache>/models/tiny-arith-<hash>`` where ``<cache>`` is ``$RLALIGN_RAY_CACHE``
or ``~/.cache/rlalign_ray`` and ``<hash>`` is a short hash of the recipe, so
changing the recipe never reuses a stale folder.  The folder is built under an
exclusive ``fcntl.flock`` (several Ray actors may resolve the path at once:
one builds, the others wait and then reuse it) into a temporary directory
that is renamed into place atomically, so a half-built folder is never
visible.  Any path not starting with ``builtin:`` is returned unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

logger = logging.getLogger(__name__)

PREFIX = "builtin:"
MARKER = "rlalign_ray_builtin.json"
RECIPE_VERSION = 1

# name -> recipe (everything that determines the built weights).
BUILTIN_RECIPES: dict[str, dict] = {
    "tiny-arith": {
        "version": RECIPE_VERSION,
        "arch": "llama",
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 320},
        "seed": 0,
        "task": "arith",
        "data": {"n_train": 2000, "n_eval": 128, "seed": 1234, "lo": 0, "hi": 99},
        "warmup": {
            "steps": 400,
            "lr": 2e-3,
            "batch_size": 64,
            "seed": 0,
            "target_accuracy": 0.35,
        },
        "num_threads": 1,
        "approx_seconds": 30,
    },
    # the multi-turn demo: sums of three numbers with a calculator tool (tasks/calculator.py)
    "tiny-calc": {
        "version": RECIPE_VERSION,
        "arch": "llama",
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 320},
        "seed": 0,
        "task": "calc",
        "warmup": {
            "steps": 700,
            "lr": 2e-3,
            "batch_size": 64,
            "p_tool": 0.6,
            "p_first": 0.2,
            "seed": 0,
        },
        "num_threads": 2,
        "approx_seconds": 300,
    },
}


def cache_dir() -> str:
    """``$RLALIGN_RAY_CACHE`` or ``~/.cache/rlalign_ray``."""
    return os.environ.get("RLALIGN_RAY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rlalign_ray"
    )


def recipe_hash(recipe: dict) -> str:
    """Short, stable hash of a recipe (``approx_seconds`` is not part of it)."""
    payload = {k: v for k, v in recipe.items() if k != "approx_seconds"}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _get_recipe(name: str) -> dict:
    if name not in BUILTIN_RECIPES:
        known = ", ".join(PREFIX + k for k in sorted(BUILTIN_RECIPES))
        raise ValueError(f"unknown builtin model {PREFIX + name!r}; known: {known}")
    return BUILTIN_RECIPES[name]


def builtin_model_dir(name: str, recipe: dict | None = None, root: str | None = None) -> str:
    """Where ``builtin:<name>`` lives (whether or not it is built yet)."""
    recipe = recipe if recipe is not None else _get_recipe(name)
    return os.path.join(root or cache_dir(), "models", f"{name}-{recipe_hash(recipe)}")


def _is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


@contextlib.contextmanager
def _file_lock(lock_path: str):
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(name: str, recipe: dict, out_dir: str) -> dict:
    from rlalign_ray.models.tiny import _num_threads, build_tiny_model, warmup_sft
    from rlalign_ray.tasks.arithmetic import train_eval_split

    info: dict = {"name": name, "recipe": recipe, "recipe_hash": recipe_hash(recipe)}
    with _num_threads(recipe.get("num_threads")):
        model, tok = build_tiny_model(
            out_dir, arch=recipe["arch"], seed=recipe.get("seed", 0), **recipe["model"]
        )
        if recipe.get("task") == "arith":
            train, evals = train_eval_split(**recipe.get("data", {}))
            info["warmup"] = warmup_sft(
                out_dir,
                train,
                eval_problems=evals,
                model=model,
                tokenizer=tok,
                **recipe.get("warmup", {}),
            )
        elif recipe.get("task") == "calc":
            from rlalign_ray.tasks.calculator import make_split
            from rlalign_ray.tasks.calculator import warmup_sft as calc_warmup

            train, _ = make_split()
            info["warmup"] = calc_warmup(model, tok, train, **recipe.get("warmup", {}))
            model.save_pretrained(out_dir, safe_serialization=True)
        elif recipe.get("task") is not None:
            raise ValueError(f"unknown warm-up task {recipe['task']!r}")
    return info


def ensure_builtin(name: str, recipe: dict | None = None, root: str | None = None) -> str:
    """Build ``builtin:<name>`` if needed (once, under a file lock) and return its folder.

    ``recipe`` overrides the registered recipe (used by tests for a fast build);
    the folder name follows its hash.
    """
    recipe = copy.deepcopy(recipe if recipe is not None else _get_recipe(name))
    final = builtin_model_dir(name, recipe, root)
    if _is_built(final):
        return final
    models_dir = os.path.dirname(final)
    with _file_lock(os.path.join(models_dir, f".{os.path.basename(final)}.lock")):
        if _is_built(final):  # built by another process while we waited
            return final
        if os.path.exists(final):  # stale leftover without marker: rebuild
            shutil.rmtree(final, ignore_errors=True)
        logger.info(
            "building %s%s (first use, ~%s s) into %s ...",
            PREFIX,
            name,
            recipe.get("approx_seconds", "?"),
            final,
        )
        t0 = time.time()
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=models_dir)
        os.chmod(tmp, 0o755)
        try:
            info = _build(name, recipe, tmp)
            info["build_seconds"] = time.time() - t0
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump(info, f, indent=2, sort_keys=True, default=str)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built %s%s in %.1f s", PREFIX, name, time.time() - t0)
    return final


def resolve_model_path(path: str) -> str:
    """Resolve ``builtin:<name>`` to a local folder (building it on first use).

    Any other path is returned unchanged; unknown builtin names raise ``ValueError``.

    >>> resolve_model_path("/models/my-llama")
    '/models/my-llama'
    """
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX) :]
    _get_recipe(name)
    return ensure_builtin(name)
