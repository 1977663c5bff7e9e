"""Run a ``tests.helpers`` module in a fresh Python process (DeepSpeed's process group, or
CUDA, set up once per process) and read the JSON it prints on its ``RESULT`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_helper(module: str, *args: str, accelerator: str = "cpu", timeout: int = 600) -> Any:
    """``python -m tests.helpers.<module> ARGS`` with ``DS_ACCELERATOR=accelerator``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        "DS_ACCELERATOR": accelerator,
    }
    out = subprocess.run(
        [sys.executable, "-m", f"tests.helpers.{module}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])
