"""``maelab report RUN_DIR``: one self-contained HTML page about a pre-training run.

The page shows the run's status and key numbers, the loss / lr / throughput curves (and kNN top-1 when
logged) as inline SVG charts, the reconstruction grids of every epoch as embedded PNGs, the evaluation
results found next to the run (:func:`find_evals`), the resolved config and the environment
(``env.json``). Nothing is fetched from anywhere: no external scripts, styles, fonts or images, so the
file opens offline and can be mailed or archived on its own.

The HTML pieces are pure functions of records: :func:`line_chart` draws any number of series and
:func:`render_page` lays out any list of :class:`Section`, neither knows about runs, so a page about
several runs (a sweep: one curve per run) can be built from them. :func:`load_run_files` reads a run
directory once and :func:`run_sections` turns it into sections.

A run that is still running is fine: partial last lines of ``metrics.jsonl`` / ``steps.jsonl`` are
skipped (:func:`maelab.engine.metrics.read_records`), and the page says that the last epoch is not
reached yet.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maelab.engine.metrics import ENV_FILE, STEP_LOG, read_records
from maelab.errors import ConfigError
from maelab.io import atomic_write
from maelab.viz.compare import summarize_run
from maelab.viz.curves import _series, wants_log_scale

REPORT_FILE = "report.html"
"""Default output, inside the run directory."""

RUN_FILES = ("config.yaml", "metrics.jsonl", STEP_LOG)
"""A folder holding none of these is not a pre-training run directory."""

EVAL_FILE = "eval.json"
EVAL_SEARCH_DEPTH = 3
"""Evaluations are looked for at most this many folder levels below the run's parent folder."""

MAX_POINTS = 2000
"""A series with more points is thinned (every k-th point, the last one kept) to keep the page small."""

MAX_MARKED = 60
"""Series with at most this many points get a marker with a hover tooltip at each point."""

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_RECON = re.compile(r"^reconstruction_epoch(\d+)\.png$")


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------- reading a run
@dataclass
class RunFiles:
    """What a run directory holds, read once (absent or unreadable files are empty / None)."""

    path: Path
    config_text: str | None = None
    config: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    steps: list[dict[str, Any]] = field(default_factory=list)  # steps.jsonl
    env: dict[str, Any] | None = None
    reconstructions: list[tuple[int, Path]] = field(default_factory=list)  # (epoch, PNG), epoch order
    evals: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (eval.json, its record)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_mapping(text: str | None, json_text: bool = False) -> dict[str, Any] | None:
    """A YAML (or, with ``json_text``, JSON) mapping; None when missing, half-written or not a mapping."""
    if text is None:
        return None
    try:
        data = json.loads(text) if json_text else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def reconstruction_grids(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``figures/reconstruction_epochNNNN.png`` of a run as (epoch, path), in epoch order."""
    found = []
    for p in (Path(run_dir) / "figures").glob("reconstruction_epoch*.png"):
        m = _RECON.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_evals(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The ``eval.json`` files that evaluated this run, oldest first.

    Looked for in the folders at most :data:`EVAL_SEARCH_DEPTH` levels below the run's parent folder
    (so in the run directory and its subfolders, and in sibling folders and theirs); one counts when its
    ``checkpoint`` is the run directory or a file inside it (``checkpoints/last.pt``, ``epoch_NNNN.pt``).
    """
    run = Path(run_dir).resolve()
    found: list[tuple[Path, dict[str, Any]]] = []
    for depth in range(1, EVAL_SEARCH_DEPTH + 1):
        for p in sorted(run.parent.glob("*/" * depth + EVAL_FILE)):
            record = _read_mapping(_read_text(p), json_text=True)
            if record is None:
                continue
            source = record.get("checkpoint")
            if not isinstance(source, str) or source == "scratch":
                continue
            target = Path(source).expanduser().resolve()
            if target == run or run in target.parents:
                found.append((p, record))
    return sorted(found, key=lambda item: (str(item[1].get("time", "")), str(item[0])))


def load_run_files(run_dir: str | Path) -> RunFiles:
    """Read a run directory (see README: config.yaml, metrics.jsonl, steps.jsonl, figures/, env.json).

    Raises:
        ConfigError: ``run_dir`` is not a folder, or holds none of config.yaml, metrics.jsonl, steps.jsonl.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(
            f"{path} is not a directory: give a pre-training run directory (the --output of maelab pretrain)"
        )
    if not any((path / name).is_file() for name in RUN_FILES):
        raise ConfigError(f"{path} is not a pre-training run directory: none of {', '.join(RUN_FILES)} is there")
    config_text = _read_text(path / "config.yaml")
    return RunFiles(
        path=path,
        config_text=config_text,
        config=_read_mapping(config_text),
        epochs=read_records(path / "metrics.jsonl"),
        steps=read_records(path / STEP_LOG),
        env=_read_mapping(_read_text(path / ENV_FILE), json_text=True),
        reconstructions=reconstruction_grids(path),
        evals=find_evals(path),
    )


# ---------------------------------------------------------------------------------- numbers
def fmt(value: Any, spec: str = ".4g") -> str:
    """A value for people: ints as they are, floats with ``spec``, other values as text; '-' for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _short(v: float) -> str:
    """An axis or tooltip number: whole numbers in full (step 12000, not 1.2e+04), others to 4 digits."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e9 else format(v, ".4g")


def run_status(files: RunFiles) -> tuple[bool, str]:
    """(finished, one line): finished when the last epoch record is the config's last epoch."""
    total = (files.config or {}).get("epochs")
    done = files.epochs[-1].get("epoch", 0) if files.epochs else 0
    steps = [r["step"] for r in files.epochs + files.steps if isinstance(r.get("step"), int)]
    step = f", step {max(steps)}" if steps else ""
    if isinstance(total, int) and isinstance(done, int) and done >= total:
        return True, f"finished: {done} of {total} epochs{step}"
    if not done:
        return False, f"in progress: no epoch finished yet{step}"
    of = f" of {total}" if isinstance(total, int) else ""
    return False, (
        f"in progress: epoch {done}{of} done{step} (still running, or stopped: "
        "continue it with maelab pretrain --resume)"
    )


def key_numbers(files: RunFiles) -> list[tuple[str, str]]:
    """(name, value) rows of the summary table."""
    cfg = files.config or {}
    summary = summarize_run(
        {"name": files.path.name, "path": str(files.path), "epochs": files.epochs, "steps": files.steps}
    )
    last = files.epochs[-1] if files.epochs else {}
    lrs = _series(files.steps or files.epochs, "step", "lr")[1]
    times = _series(files.epochs, "epoch", "epoch_time_s")[1]
    rows = [
        ("model", fmt(cfg.get("model"))),
        ("data", fmt((cfg.get("data") or {}).get("name"))),
        ("epochs done", f"{fmt(last.get('epoch', 0))} of {fmt(cfg.get('epochs'))}"),
        ("steps", fmt(max([r.get("step", 0) for r in files.epochs + files.steps] or [0]))),
        (
            "final loss (mean of the last 10% of logged losses)",
            fmt(summary["final_loss"], ".4f")
            + (f" ± {summary['final_loss_std']:.4f}" if summary["final_loss_std"] else ""),
        ),
        ("last epoch loss", fmt(last.get("loss"), ".4f")),
        ("peak lr", fmt(max(lrs) if lrs else None, ".3g")),
        ("throughput (median over epochs)", fmt(summary["img_per_s_median"], ".1f") + " img/s"),
        ("training time", f"{fmt(sum(times), '.1f')} s" if times else "-"),
    ]
    if summary["knn_top1_last"] is not None:
        rows += [("kNN top-1 last / best", f"{summary['knn_top1_last']:.2f}% / {summary['knn_top1_best']:.2f}%")]
    return rows


# ---------------------------------------------------------------------------------- SVG charts
@dataclass
class Series:
    """One line of a chart: (x, y) points, a legend label, and whether each point gets a marker."""

    label: str
    xs: list[float]
    ys: list[float]
    markers: bool = False


def series_of(records: Sequence[dict[str, Any]], x: str, y: str, label: str, markers: bool = False) -> Series:
    """The finite (``x``, ``y``) pairs of ``records`` as a :class:`Series`."""
    xs, ys = _series(records, x, y)
    return Series(label, xs, ys, markers)


def _thin(s: Series) -> Series:
    if len(s.xs) <= MAX_POINTS:
        return s
    k = math.ceil(len(s.xs) / MAX_POINTS)
    keep = list(range(0, len(s.xs), k))
    if keep[-1] != len(s.xs) - 1:
        keep.append(len(s.xs) - 1)
    return Series(s.label, [s.xs[i] for i in keep], [s.ys[i] for i in keep], s.markers)


def _span(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi == lo:
        d = abs(lo) * 0.05 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


def _ticks(lo: float, hi: float, log: bool, integer: bool = False) -> list[float]:
    """Tick values (in data units) inside [lo, hi], given in axis units (log10 when ``log``); whole numbers
    only when ``integer``."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    if log:
        values = LogLocator(base=10, subs=(1.0, 2.0, 5.0)).tick_values(10**lo, 10**hi)
        inside = [float(v) for v in values if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
        if len(inside) > 8:
            inside = [v for v in inside if math.isclose(10 ** round(math.log10(v)), v)]
        return inside
    values = MaxNLocator(nbins=6, integer=integer).tick_values(lo, hi)
    return [float(v) for v in values if lo - 1e-9 * (hi - lo) <= v <= hi + 1e-9 * (hi - lo)]


def line_chart(
    series: Sequence[Series], title: str, xlabel: str, ylabel: str, width: int = 540, height: int = 300
) -> str:
    """An inline ``<svg class="chart">``: axes with ticks and labels, a grid, one polyline per series,
    a legend, and hover tooltips (``<title>``) on marked points. The y axis is logarithmic when the values
    span more than 10x (:func:`~maelab.viz.curves.wants_log_scale`). Empty series draw "no data yet"."""
    left, right, top, bottom = 72, 16, 46, 46
    pw, ph = width - left - right, height - top - bottom
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(title)}" font-family="sans-serif" font-size="11">',
        f"<title>{esc(title)}</title>",
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>',
        f'<text x="{left + pw / 2:.0f}" y="{height - 8}" text-anchor="middle">{esc(xlabel)}</text>',
        f'<text transform="translate(14 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle">{esc(ylabel)}</text>',
    ]
    series = [_thin(s) for s in series if s.xs]
    if not series:
        out.append(
            f'<text x="{left + pw / 2:.0f}" y="{top + ph / 2:.0f}" text-anchor="middle" fill="#888">'
            "no data yet</text></svg>"
        )
        return "\n".join(out)
    ys_all = [y for s in series for y in s.ys]
    log = wants_log_scale(ys_all)
    x0, x1 = _span(min(x for s in series for x in s.xs), max(x for s in series for x in s.xs), 0.0)
    y_axis = [math.log10(y) for y in ys_all] if log else ys_all
    y0, y1 = _span(min(y_axis), max(y_axis), 0.06)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - ((math.log10(y) if log else y) - y0) / (y1 - y0) * ph

    whole_x = all(float(x).is_integer() for s in series for x in s.xs)
    for t in _ticks(x0, x1, False, integer=whole_x):
        out.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{px(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{esc(_short(t))}</text>'
        )
    for t in _ticks(y0, y1, log):
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{esc(_short(t))}</text>'
        )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>')
        if s.markers or len(s.xs) <= MAX_MARKED:
            out += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{esc(s.label)}: '
                f"{esc(xlabel)} {esc(_short(x))}, {esc(ylabel)} {esc(_short(y))}</title></circle>"
                for x, y in zip(s.xs, s.ys)
            ]
        lx = left + 170 * i  # the legend: one row between the title and the plot
        out.append(
            f'<line x1="{lx}" x2="{lx + 20}" y1="{top - 12}" y2="{top - 12}" stroke="{color}" '
            f'stroke-width="2"/><text x="{lx + 25}" y="{top - 8}">{esc(s.label)}</text>'
        )
    if log:
        out.append(f'<text x="{left + pw}" y="{top - 8}" text-anchor="end" fill="#888">log scale</text>')
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- HTML pieces
@dataclass
class Section:
    """One ``<section>`` of a page: anchor id, heading, and body HTML (already escaped)."""

    id: str
    heading: str
    body: str


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """An HTML table of already formatted cell texts (escaped here)."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def data_uri(path: Path, mime: str = "image/png") -> str | None:
    """The file as a ``data:`` URI (None when unreadable)."""
    try:
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#222;
background:#f6f6f6;line-height:1.4}
main{max-width:1180px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:1.6em;margin:.3em 0}h2{font-size:1.25em;border-bottom:2px solid #ccc;padding-bottom:3px;margin-top:1.5em}
nav a{margin-right:1.2em}.path{font-family:monospace;color:#555}
.status{display:inline-block;padding:6px 12px;border-radius:6px;font-weight:600;margin:6px 0}
.finished{background:#dff0d8;color:#1b5e20}.running{background:#fff3cd;color:#7a5300}
table{border-collapse:collapse;font-size:.92em;background:#fff}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}th{background:#eee}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:14px}
svg.chart{background:#fff;border:1px solid #ccc;border-radius:4px;max-width:100%;height:auto}
.grids{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ccc;border-radius:4px;padding:6px}
figure img{width:100%;height:auto;display:block}figcaption{text-align:center;font-weight:600;margin-top:4px}
pre{background:#fff;border:1px solid #ccc;padding:10px;overflow:auto;font-size:.85em;max-height:640px}
.note{color:#666}img.broken{outline:3px solid #c00}
"""

# Marks the page once loaded: how many images decoded and how many charts there are (the browser test reads it).
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  images.forEach(function (img) { if (decoded.indexOf(img) < 0) img.classList.add("broken"); });
  var charts = document.querySelectorAll("svg.chart").length;
  document.documentElement.setAttribute("data-report-ready",
      decoded.length + "/" + images.length + " images, " + charts + " charts");
});
"""


def render_page(title: str, header: str, sections: Sequence[Section]) -> str:
    """A whole HTML document: ``title``, a header (HTML), a link bar and the sections; inline CSS and script."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.heading)}</a>' for s in sections)
    body = "\n".join(f'<section id="{esc(s.id)}"><h2>{esc(s.heading)}</h2>\n{s.body}\n</section>' for s in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n<header>{header}</header>\n<nav>{nav}</nav>\n{body}\n</main>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# ---------------------------------------------------------------------------------- a run's sections
def curves_section(files: RunFiles) -> Section:
    """Loss, lr and throughput per step (log intervals and epoch means), kNN top-1 per epoch when logged."""
    steps, epochs = files.steps, files.epochs
    charts = [
        line_chart(
            [
                series_of(steps, "step", "loss", "every log interval"),
                series_of(epochs, "step", "loss", "epoch mean", markers=True),
            ],
            "training loss",
            "step",
            "loss",
        ),
        line_chart(
            [
                max(
                    series_of(steps, "step", "lr", "every log interval"),
                    series_of(epochs, "step", "lr", "end of epoch", markers=True),
                    key=lambda s: len(s.xs),
                )
            ],
            "learning rate",
            "step",
            "lr",
        ),
        line_chart(
            [
                series_of(steps, "step", "img_per_s", "every log interval"),
                series_of(epochs, "step", "img_per_s", "epoch mean", markers=True),
            ],
            "throughput",
            "step",
            "images / s",
        ),
    ]
    if any("knn_top1" in r for r in epochs):
        charts.append(
            line_chart(
                [series_of(epochs, "epoch", "knn_top1", "kNN top-1", markers=True)],
                "kNN top-1 of the encoder",
                "epoch",
                "top-1 (%)",
            )
        )
    return Section("curves", "Training curves", f'<div class="charts">{"".join(charts)}</div>')


def reconstructions_section(files: RunFiles) -> Section:
    """The reconstruction grids (original | masked | reconstruction | + visible), in epoch order."""
    figures = []
    for epoch, path in files.reconstructions:
        uri = data_uri(path)
        if uri is not None:
            figures.append(
                f'<figure><img src="{uri}" alt="reconstructions after epoch {epoch}">'
                f"<figcaption>epoch {epoch}</figcaption></figure>"
            )
    if not figures:
        return Section(
            "reconstructions",
            "Reconstructions",
            note("no reconstruction grid yet (figures/ is written every vis_every epochs and at the end)"),
        )
    return Section(
        "reconstructions",
        "Reconstructions",
        note(
            "columns: original | masked | reconstruction | reconstruction + visible patches; "
            "the same images and masks every epoch"
        )
        + f'<div class="grids">{"".join(figures)}</div>',
    )


def _eval_row(run: Path, path: Path, record: dict[str, Any]) -> list[str]:
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {}
    others = ", ".join(f"{k}={fmt(v)}" for k, v in metrics.items() if k not in ("top1", "top5"))
    source = Path(str(record.get("checkpoint"))).expanduser().resolve()
    encoder = "the run directory" if source == run else str(source.relative_to(run))
    return [
        fmt(record.get("protocol")),
        fmt(record.get("dataset")),
        fmt(metrics.get("top1"), ".2f"),
        fmt(metrics.get("top5"), ".2f"),
        others,
        encoder,
        str(path.parent.relative_to(run.parent)),
        fmt(record.get("time")),
    ]


def evals_section(files: RunFiles) -> Section:
    """One row per ``eval.json`` that names this run (see :func:`find_evals`)."""
    if not files.evals:
        return Section(
            "evals",
            "Evaluations",
            note(
                "no evaluation found: maelab knn/linprobe/finetune --checkpoint RUN_DIR --output DIR "
                "writes DIR/eval.json; "
                "reports look in the run directory and its sibling folders, up to 3 levels below the run's parent"
            ),
        )
    run = files.path.resolve()
    rows = [_eval_row(run, path, record) for path, record in files.evals]
    return Section(
        "evals",
        "Evaluations",
        table(rows, ("protocol", "dataset", "top-1 (%)", "top-5 (%)", "other metrics", "encoder", "folder", "time")),
    )


def config_section(files: RunFiles) -> Section:
    body = f"<pre>{esc(files.config_text)}</pre>" if files.config_text is not None else note("config.yaml is missing")
    return Section("config", "Configuration (config.yaml)", body)


def environment_section(files: RunFiles) -> Section:
    if files.env is None:
        return Section(
            "environment",
            "Environment",
            note(f"{ENV_FILE} is missing: the run was started by a maelab that did not record its environment"),
        )
    return Section(
        "environment",
        "Environment",
        note(f"{ENV_FILE}: written when the run last (re)started") + table([(k, fmt(v)) for k, v in files.env.items()]),
    )


def run_sections(files: RunFiles) -> list[Section]:
    """Summary, curves, reconstructions, evaluations, config and environment of one run."""
    summary = Section("summary", "Summary", table(key_numbers(files)))
    return [
        summary,
        curves_section(files),
        reconstructions_section(files),
        evals_section(files),
        config_section(files),
        environment_section(files),
    ]


def run_header(files: RunFiles) -> str:
    from maelab import __version__

    finished, status = run_status(files)
    return (
        f"<h1>maelab run report: {esc(files.path.name)}</h1>"
        f'<div class="path">{esc(files.path.resolve())}</div>'
        f'<div class="status {"finished" if finished else "running"}">{esc(status)}</div>'
        + note(f"generated {time.strftime('%Y-%m-%d %H:%M:%S')} by maelab {__version__}")
    )


SWEEP_FILE = "sweep.json"
"""What marks a ``maelab sweep`` output directory (:func:`maelab.sweep.write_sweep`)."""


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def sweep_sections(sweep_dir: Path) -> list[Section]:
    """The comparison table, the sweep's figures, and per run its last reconstruction and loss curve."""
    from maelab.sweep import COLUMNS, _cell

    record = _read_mapping(_read_text(sweep_dir / SWEEP_FILE), json_text=True) or {}
    rows = record.get("rows") or []
    header = [h for _, h in COLUMNS]
    body = [[_cell(r.get(k)) for k, _ in COLUMNS] for r in rows]
    sections = [Section("table", "Comparison", table(body, header) if body else note("no runs yet"))]
    figures = sorted(p for p in sweep_dir.glob("*.png"))
    if figures:
        sections.append(Section("figures", "Figures", _figures([(p.stem, p) for p in figures])))
    per_run = []
    for r in rows:
        run_dir = sweep_dir / str(r.get("run")) / "pretrain"
        grids = reconstruction_grids(run_dir) if run_dir.is_dir() else []
        shown = [(f"{r.get('run')}: reconstruction, epoch {grids[-1][0]}", grids[-1][1])] if grids else []
        curve = run_dir / "figures" / "loss_curve.png"
        if curve.is_file():
            shown.append((f"{r.get('run')}: loss", curve))
        per_run += shown
    if per_run:
        sections.append(Section("runs", "Runs", _figures(per_run)))
    budget = record.get("budget_s")
    sections.append(
        Section(
            "about",
            "About",
            table(
                [
                    ("sweep", str(record.get("name"))),
                    ("file", str(record.get("source"))),
                    ("equal pre-training budget", f"{budget:g} s" if budget else "no (equal epochs)"),
                ]
            ),
        )
    )
    return sections


def _figures(items: Sequence[tuple[str, Path]]) -> str:
    """Embedded images with captions, in a grid."""
    cells = []
    for caption, path in items:
        uri = data_uri(path)
        if uri is not None:
            cells.append(
                f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
            )
    return f'<div class="grids">{"".join(cells)}</div>'


def build_sweep_report(sweep_dir: str | Path) -> str:
    """The HTML page of a ``maelab sweep`` output directory (finished or still running)."""
    from maelab import __version__

    path = Path(sweep_dir)
    header = f'<h1>maelab sweep report: {esc(path.name)}</h1><div class="path">{esc(path.resolve())}</div>' + note(
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S')} by maelab {__version__}"
    )
    return render_page(f"maelab sweep: {path.name}", header, sweep_sections(path))


def build_report(run_dir: str | Path) -> str:
    """The HTML page of a run directory (finished or still running), or of a sweep directory."""
    if is_sweep_dir(run_dir):
        return build_sweep_report(run_dir)
    files = load_run_files(run_dir)
    return render_page(f"maelab report: {files.path.name}", run_header(files), run_sections(files))


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write :func:`build_report` to ``output`` (default ``RUN_DIR/report.html``), atomically.

    Raises:
        ConfigError: not a run directory (:func:`load_run_files`), or ``output`` cannot be written.
    """
    page = build_report(run_dir)
    out = Path(output) if output is not None else Path(run_dir) / REPORT_FILE
    return atomic_write(out, page.encode("utf-8"), "the report", ConfigError)
