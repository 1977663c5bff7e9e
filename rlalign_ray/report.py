"""``rlalign-ray report RUN_DIR``: a run's ``metrics.jsonl`` as plots.

Writes ``RUN_DIR/report.png`` (panels over steps: train and eval reward, KL, response
length, phase times) and ``RUN_DIR/report.html`` (the same image embedded, and a table of
every metric's first, last, min and max). Needs matplotlib (``pip install -e '.[report]'``).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from rlalign_ray.errors import RlalignError


class ReportError(RlalignError):
    """The run folder cannot be reported on."""


PANELS: list[tuple[str, list[str]]] = [
    ("reward", ["train/reward_mean", "eval/reward_mean"]),
    ("KL to the reference", ["train/kl"]),
    ("response length (tokens)", ["train/response_len", "eval/response_len"]),
]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, one per step (a later row for a step wins), by step."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file; give a run's trainer.output_dir")
    rows: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{i}: not a JSON line ({e})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ReportError(f"{path}:{i}: a metrics row needs a 'step' key")
        rows[int(row["step"])] = row
    if not rows:
        raise ReportError(f"{path}: no metrics rows yet")
    return [rows[s] for s in sorted(rows)]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` where it was logged as a finite number."""
    pts = [
        (int(r["step"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
    ]
    return [s for s, _ in pts], [v for _, v in pts]


def time_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith("time/") and k.endswith("_s")}
    return sorted(keys, key=lambda k: (k != "time/step_s", k))


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*PANELS, ("phase times (s)", time_keys(rows))]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, panels):
        drawn = False
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{out.parent.name}: {len(rows)} logged steps")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary(rows: list[dict[str, Any]]) -> list[tuple[str, int, float, float, float, float]]:
    """(key, points, first, last, min, max) of every numeric metric."""
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and _num(v)})
    out = []
    for key in keys:
        _, values = series(rows, key)
        if values:
            out.append((key, len(values), values[0], values[-1], min(values), max(values)))
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def write_html(rows: list[dict[str, Any]], png: Path, out: Path) -> Path:
    data = base64.b64encode(png.read_bytes()).decode()
    cells = "\n".join(
        "<tr><td>{}</td><td>{}</td><td>{:.4g}</td><td>{:.4g}</td><td>{:.4g}</td><td>{:.4g}</td></tr>".format(
            html.escape(k), n, first, last, lo, hi
        )
        for k, n, first, last, lo, hi in summary(rows)
    )
    out.write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rlalign-ray report: {html.escape(out.parent.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} table{{border-collapse:collapse}}
tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(out.parent.name)}</h1>
<p>{len(rows)} logged steps (steps {rows[0]["step"]} to {rows[-1]["step"]}), from
{html.escape(png.name)}'s data in metrics.jsonl.</p>
<img alt="{html.escape(png.name)}" src="data:image/png;base64,{data}">
<h2>Metrics</h2>
<table><tr><th>metric</th><th>points</th><th>first</th><th>last</th><th>min</th><th>max</th></tr>
{cells}
</table></body></html>
"""
    )
    return out


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """``RUN_DIR/report.png`` and ``RUN_DIR/report.html`` from ``RUN_DIR/metrics.jsonl``."""
    run = Path(run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            "rlalign-ray report needs matplotlib: pip install -e '.[report]'"
        ) from None
    png = plot(rows, run / "report.png")
    return png, write_html(rows, png, run / "report.html")
