"""Training curves from ``metrics.jsonl`` records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maelab.engine.metrics import read_records
from maelab.viz.reconstruction import _atomic_savefig


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (corrupt lines skipped); FileNotFoundError if missing."""
    if not Path(path).exists():
        raise FileNotFoundError(path)
    return read_records(path)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _series(records: Sequence[dict], x: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        xv, yv = _number(r.get(x)), _number(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def wants_log_scale(values: Sequence[float]) -> bool:
    """Whether a y axis should be logarithmic: all values are positive and span more than 10x."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _maybe_log(ax, values: list[float]) -> None:
    """Log y-scale when :func:`wants_log_scale`."""
    if wants_log_scale(values):
        ax.set_yscale("log")


def split_records(records: Sequence[dict[str, Any]], x: str = "epoch") -> tuple[list[dict], list[dict]]:
    """(records plotted against ``x``, step-level records without ``x``)."""
    records = [r for r in records if isinstance(r, dict)]
    if x == "step":
        return records, []
    return [r for r in records if x in r], [r for r in records if x not in r and "step" in r]


def save_loss_curve(
    records: Sequence[dict[str, Any]], path: str | Path, keys: Sequence[str] = ("loss",), x: str = "epoch"
) -> Path:
    """Write a PNG of ``keys`` against ``x`` (default: loss vs epoch).

    Records without ``x`` but with a ``step`` key are step-level; they are drawn in a second
    panel against ``step`` (see :func:`split_records`). The y axis
    is logarithmic when the values span more than 10x. ``knn_top1``, where present, is drawn
    on a twin y axis of the first panel. Non-numeric and non-finite values are left out.
    The file is written atomically; parent folders are created.
    """
    from matplotlib.figure import Figure

    main, steps = split_records(records, x)
    step_series = {k: _series(steps, "step", k) for k in keys}
    has_steps = any(xs for xs, _ in step_series.values())

    fig = Figure(figsize=(10.0 if has_steps else 6.0, 4.0))
    axes = fig.subplots(1, 2 if has_steps else 1, squeeze=False)[0]

    ax = axes[0]
    plotted: list[float] = []
    for k in keys:
        xs, ys = _series(main, x, k)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=k)
            plotted += ys
    _maybe_log(ax, plotted)
    ax.set_xlabel(x)
    ax.set_ylabel(", ".join(keys))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    kx, ky = _series(main, x, "knn_top1")
    if kx:
        twin = ax.twinx()
        twin.plot(kx, ky, color="tab:red", marker="s", markersize=3, linestyle="--", label="knn_top1")
        twin.set_ylabel("kNN top-1")
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best", fontsize=8)
    elif not has_steps:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{', '.join(keys)} per {x}", fontsize=10)

    if has_steps:
        ax2 = axes[1]
        plotted = []
        for k, (xs, ys) in step_series.items():
            if xs:
                ax2.plot(xs, ys, linewidth=0.8, label=k)
                plotted += ys
        _maybe_log(ax2, plotted)
        ax2.set_xlabel("step")
        ax2.grid(True, alpha=0.3)
        ax2.legend(loc="best", fontsize=8)
        ax2.set_title(f"{', '.join(keys)} per step", fontsize=10)

    fig.tight_layout()
    return _atomic_savefig(fig, path)
