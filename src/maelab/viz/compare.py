"""Side-by-side view of pre-training runs (ablations, precision paths): one table, one figure.

``maelab compare RUN_A RUN_B ...`` reads each run directory's ``metrics.jsonl`` (per epoch) and
``steps.jsonl`` (per log interval), prints a row per run (final loss, kNN, throughput) and draws the loss curves
(and kNN accuracy when logged) of all runs on shared axes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from maelab.engine.metrics import STEP_LOG, read_records
from maelab.errors import ConfigError
from maelab.viz.curves import _maybe_log, split_records
from maelab.viz.reconstruction import _atomic_savefig

TAIL_FRACTION = 0.1
"""The final loss is the mean of the last 10% of logged values (one value is noise)."""


def _finite(values: Iterable[Any]) -> list[float]:
    return [
        float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """{'name', 'path', 'epochs': epoch records, 'steps': step records} of one run directory."""
    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path} is not a pre-training run directory: {metrics} is missing")
    epochs, steps = split_records(read_records(metrics) + read_records(path / STEP_LOG))
    return {"name": path.name, "path": str(path), "epochs": epochs, "steps": steps}


def summarize_run(run: dict[str, Any]) -> dict[str, Any]:
    """Final loss (mean of the last 10% of logged losses), last/best kNN top-1, median img/s."""
    step_losses = _finite(r.get("loss") for r in run["steps"])
    epoch_losses = _finite(r.get("loss") for r in run["epochs"])
    losses = step_losses or epoch_losses
    tail = losses[-max(1, math.ceil(TAIL_FRACTION * len(losses))) :] if losses else []
    knn = _finite(r.get("knn_top1") for r in run["epochs"])
    speed = _finite(r.get("img_per_s") for r in run["epochs"])
    last = run["epochs"][-1] if run["epochs"] else {}
    return {
        "name": run["name"],
        "path": run["path"],
        "epochs": last.get("epoch"),
        "steps": last.get("step"),
        "final_loss": statistics.fmean(tail) if tail else None,
        "final_loss_std": statistics.pstdev(tail) if len(tail) > 1 else None,
        "knn_top1_last": knn[-1] if knn else None,
        "knn_top1_best": max(knn) if knn else None,
        "img_per_s_median": statistics.median(speed) if speed else None,
    }


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize_run` rows."""

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    width = max([len("run")] + [len(r["name"]) for r in rows])
    lines = [f"{'run':<{width}}  {'epochs':>6}  {'final loss':>16}  {'kNN last':>8}  {'kNN best':>8}  {'img/s':>8}"]
    for r in rows:
        loss = num(r["final_loss"], ".4f") + (f" ±{r['final_loss_std']:.4f}" if r["final_loss_std"] else "")
        lines.append(
            f"{r['name']:<{width}}  {num(r['epochs'], 'd'):>6}  {loss:>16}  {num(r['knn_top1_last'], '.2f'):>8}"
            f"  {num(r['knn_top1_best'], '.2f'):>8}  {num(r['img_per_s_median'], '.0f'):>8}"
        )
    return "\n".join(lines)


def save_comparison(runs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG: loss per step (or per epoch when no step records) of every run; kNN top-1 per epoch
    in a second panel when any run logged it. Written atomically."""
    from matplotlib.figure import Figure

    has_knn = any(_finite(r.get("knn_top1") for r in run["epochs"]) for run in runs)
    fig = Figure(figsize=(10.0 if has_knn else 6.0, 4.0))
    axes = fig.subplots(1, 2 if has_knn else 1, squeeze=False)[0]
    ax = axes[0]
    plotted: list[float] = []
    x = "step" if any(run["steps"] for run in runs) else "epoch"
    for run in runs:
        records = run["steps"] or run["epochs"]  # epoch records carry their step too: one shared x axis
        pts = [(r[x], r["loss"]) for r in records if _finite([r.get("loss")]) and x in r]
        if pts:
            ax.plot(*zip(*pts), linewidth=0.9, marker="o" if len(pts) <= 50 else None, markersize=3, label=run["name"])
            plotted += [y for _, y in pts]
    ax.set_xlabel(x)
    ax.set_ylabel("loss")
    _maybe_log(ax, plotted)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("pre-training loss", fontsize=10)
    if has_knn:
        ax2 = axes[1]
        for run in runs:
            pts = [(r["epoch"], r["knn_top1"]) for r in run["epochs"] if _finite([r.get("knn_top1")])]
            if pts:
                ax2.plot(*zip(*pts), marker="o", markersize=3, label=run["name"])
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("kNN top-1 (%)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(loc="best", fontsize=8)
        ax2.set_title("kNN accuracy of the encoder", fontsize=10)
    fig.tight_layout()
    return _atomic_savefig(fig, path)
