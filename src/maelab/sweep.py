"""``maelab sweep``: run a list of pre-training runs and their evaluations, and tabulate them.

A sweep file (YAML) lists runs and the evaluations of each::

    name: methods
    data: ../shared/data/cifar10          # default data.name of every run and evaluation (--data overrides)
    scales:                               # --scale NAME picks one: overrides for every run of the sweep,
      cpu: {pretrain: {data.num_workers: 2}, budget_s: 600, evals: {linprobe: {epochs: 5}, finetune: {skip: true}}}
      gpu: {pretrain: {}, budget_s: 7200}
    pretrain: {config: recipes/cifar10_vit_tiny.yaml}   # shared by every run (a recipe and key=value overrides)
    evals:                                # for every run, in order: knn, linprobe, finetune
      - {protocol: knn}
      - {protocol: linprobe, config: recipes/linprobe_cifar10_vit_tiny.yaml}
    runs:
      - {name: mae}
      - {name: simmim, pretrain: {method: simmim, model_args.mask_ratio: 0.6}}
      - {name: beit, pretrain: {config: recipes/beit_cifar10_vit_tiny.yaml},
         tokenizer: {config: recipes/tokenizer_cifar10.yaml}}   # trained first; method_args.tokenizer set to it
      - {name: swin, pretrain: {config: recipes/simmim_cifar10_swin_tiny.yaml},
         scales: {cpu: {pretrain: {model: swin_pico_patch2_window4_32}}}}   # a run's own, at a scale, win

Each run writes ``OUTPUT/<name>/pretrain/`` (a run directory) and ``OUTPUT/<name>/<protocol>/`` (``eval.json``); a
run with a ``tokenizer`` (BEiT) first trains it into ``OUTPUT/<name>/tokenizer/``.
Finished parts are skipped, an interrupted pre-training is resumed (``--resume`` semantics), so re-running the
same command continues the sweep. With ``budget_s`` every run gets the same pre-training wall-clock: a few
timed steps of each run (on rank 0, once; kept in ``OUTPUT/<name>/plan.json``) set its ``epochs``. At the end
(and after every run) ``sweep.json``, ``sweep.csv``, ``sweep.md`` and ``sweep.png`` are written.

Under torchrun every process runs every run (each run across all processes); rank 0 writes the sweep's files.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from maelab.errors import ConfigError
from maelab.io import atomic_write, write_json

log = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linprobe", "finetune")
PLAN_FILE = "plan.json"
CALIBRATION_STEPS = 8
"""Timed optimizer steps per run (after one untimed), each on fresh batches, when ``budget_s`` sets the epochs."""

COLUMNS = (
    ("run", "run"),
    ("method", "method"),
    ("overrides", "overrides"),
    ("epochs", "epochs"),
    ("pretrain_s", "pre-training s"),
    ("tokenizer_s", "tokenizer s"),
    ("img_per_s", "img/s"),
    ("gflops_per_img", "GFLOPs/img"),
    ("final_loss", "final loss"),
    ("knn_top1", "kNN top-1"),
    ("linprobe_top1", "linear probe top-1"),
    ("finetune_top1", "fine-tune top-1"),
)
"""(key, header) of the sweep table: one row per run."""


@dataclass
class EvalSpec:
    protocol: str
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSpec:
    name: str
    pretrain: dict[str, Any]
    """Pre-training overrides (dotted keys), ``config`` = the recipe."""
    evals: list[EvalSpec]
    tokenizer: dict[str, Any] | None = None
    """Tokenizer training overrides (``config`` = its recipe), for methods that need one (BEiT)."""
    own: dict[str, Any] = field(default_factory=dict)
    """The run's own pre-training overrides (what sets it apart in the table)."""


@dataclass
class FigureSpec:
    """A line plot of the runs' top-1 against one of their settings (the MAE paper's Fig. 5 style)."""

    file: str
    x: str
    runs: list[str]
    title: str = ""


@dataclass
class Sweep:
    name: str
    runs: list[RunSpec]
    budget_s: float | None = None
    source: Path | None = None
    figures: list[FigureSpec] = field(default_factory=list)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of key: value, got {value!r}")
    return dict(value)


def _flatten(prefix: str, value: dict[str, Any]) -> dict[str, Any]:
    """Nested mappings as dotted keys (``{data: {name: x}}`` -> ``{data.name: x}``); ``model_args`` and
    ``method_args`` stay whole below their first level."""
    out: dict[str, Any] = {}
    for key, v in value.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict) and key not in ("model_args", "method_args") and not prefix.endswith("_args."):
            out.update(_flatten(name + ".", v))
        else:
            out[name] = v
    return out


def load_sweep(path: str | Path, scale: str | None = None, data: str | None = None) -> Sweep:
    """Read a sweep file, applying ``scale`` (one of its ``scales``) and ``data`` (default ``data.name``).

    Raises:
        ConfigError: a missing file, an unknown key, scale or protocol, a duplicate run name (one line each).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from e
    raw = _mapping(raw, str(p))
    allowed = ("name", "description", "data", "scales", "pretrain", "evals", "runs", "figures")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    scales = _mapping(raw.get("scales"), f"{p}: scales")
    picked: dict[str, Any] = {}
    if scale is not None:
        if scale not in scales:
            raise ConfigError(f"{p}: unknown --scale {scale!r}; this sweep has {sorted(scales) or 'no scales'}")
        picked = _mapping(scales[scale], f"{p}: scales.{scale}")
    base_pretrain = _flatten("", _mapping(raw.get("pretrain"), f"{p}: pretrain"))
    scale_pretrain = _flatten("", _mapping(picked.get("pretrain"), f"{p}: scales.{scale}.pretrain"))
    scale_evals = _mapping(picked.get("evals"), f"{p}: scales.{scale}.evals")
    data_name = data or raw.get("data")

    def eval_specs(items: Any, where: str) -> list[EvalSpec]:
        specs = []
        for i, item in enumerate(items or []):
            item = _mapping(item, f"{where}[{i}]")
            protocol = item.pop("protocol", None)
            if protocol not in PROTOCOLS:
                raise ConfigError(f"{where}[{i}]: protocol={protocol!r}; one of {', '.join(PROTOCOLS)}")
            at_scale = _mapping(scale_evals.get(protocol), f"{p}: scales.{scale}.evals.{protocol}")
            if at_scale.pop("skip", False):  # this scale leaves the evaluation out
                continue
            config = item.pop("config", None)
            overrides = {**_flatten("", item.pop("overrides", None) or {}), **_flatten("", item)}
            overrides.update(_flatten("", at_scale))
            if data_name:
                overrides.setdefault("data.name", data_name)
            specs.append(EvalSpec(protocol, config, overrides))
        return specs

    shared_evals = eval_specs(raw.get("evals"), f"{p}: evals")
    runs: list[RunSpec] = []
    for i, item in enumerate(raw.get("runs") or []):
        item = _mapping(item, f"{p}: runs[{i}]")
        name = str(item.get("name") or "")
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{p}: runs[{i}].name={name!r}: a folder name is required")
        if any(r.name == name for r in runs):
            raise ConfigError(f"{p}: runs[{i}].name={name!r} appears twice")
        own = _flatten("", _mapping(item.get("pretrain"), f"{p}: runs[{i}].pretrain"))
        # the run's own overrides at this scale win over the scale's (e.g. a Swin run's model at the cpu scale)
        run_scales = _mapping(item.get("scales"), f"{p}: runs[{i}].scales")
        unknown_scales = sorted(set(run_scales) - set(scales), key=str)
        if unknown_scales:
            raise ConfigError(
                f"{p}: runs[{i}].scales.{unknown_scales[0]}: not a scale of this sweep ({sorted(scales) or 'none'})"
            )
        at_scale = _mapping(run_scales.get(scale) if scale is not None else None, f"{p}: runs[{i}].scales.{scale}")
        if set(at_scale) - {"pretrain"}:
            raise ConfigError(
                f"{p}: runs[{i}].scales.{scale} has unknown key(s) {sorted(set(at_scale) - {'pretrain'})}; allowed: "
                "pretrain (as in the sweep's scales)"
            )
        own_at_scale = _flatten("", _mapping(at_scale.get("pretrain"), f"{p}: runs[{i}].scales.{scale}.pretrain"))
        own = {**own, **own_at_scale}
        pretrain = {**base_pretrain, **own, **scale_pretrain, **own_at_scale}
        if data_name:
            pretrain.setdefault("data.name", data_name)
        evals = eval_specs(item["evals"], f"{p}: runs[{i}].evals") if "evals" in item else shared_evals
        tokenizer = None
        if "tokenizer" in item:
            tokenizer = {
                **_flatten("", _mapping(item["tokenizer"], f"{p}: runs[{i}].tokenizer")),
                **_flatten("", _mapping(picked.get("tokenizer"), f"{p}: scales.{scale}.tokenizer")),
            }
            if data_name:
                tokenizer.setdefault("data.name", data_name)
        unknown_keys = sorted(set(item) - {"name", "pretrain", "evals", "tokenizer", "scales"})
        if unknown_keys:
            raise ConfigError(
                f"{p}: runs[{i}] has unknown key(s) {unknown_keys}; allowed: name, pretrain, evals, tokenizer, scales"
            )
        runs.append(RunSpec(name, pretrain, evals, tokenizer, own))
    if not runs:
        raise ConfigError(f"{p}: no runs")
    figures = []
    for i, item in enumerate(raw.get("figures") or []):
        item = _mapping(item, f"{p}: figures[{i}]")
        missing = [r for r in item.get("runs", []) if not any(s.name == r for s in runs)]
        if not item.get("file") or not item.get("x") or missing:
            raise ConfigError(f"{p}: figures[{i}] needs file, x and runs (names of runs); unknown runs: {missing}")
        figures.append(FigureSpec(str(item["file"]), str(item["x"]), list(item["runs"]), str(item.get("title", ""))))
    budget = picked.get("budget_s")
    return Sweep(str(raw.get("name") or p.stem), runs, float(budget) if budget else None, p, figures)


# ------------------------------------------------------------------------------------------ running
def _pretrain_config(spec: RunSpec, output: Path, epochs: int | None = None) -> Any:
    from maelab.config import PretrainConfig, build_config

    overrides = {k: v for k, v in spec.pretrain.items() if k != "config"}
    overrides["output"] = str(output)
    if spec.tokenizer is not None:
        overrides["method_args.tokenizer"] = str(output.parent / "tokenizer")
    if epochs is not None:
        overrides["epochs"] = epochs
    return build_config(PretrainConfig, spec.pretrain.get("config"), overrides)


def _finished(run_dir: Path, epochs: int) -> bool:
    """A pre-training run directory whose metrics reach its last epoch."""
    from maelab.engine.metrics import read_records

    records = read_records(run_dir / "metrics.jsonl")
    return bool(records) and records[-1].get("epoch") == epochs and (run_dir / "checkpoints" / "last.pt").exists()


def _calibrate(spec: RunSpec, run_dir: Path, steps: int = CALIBRATION_STEPS) -> dict[str, Any]:
    """Seconds per optimizer step (the mean of ``steps`` timed ones) and FLOPs per image of a run, in a scratch
    directory."""
    import tempfile

    import torch

    from maelab.bench.measure import count_flops, synchronize
    from maelab.engine.pretrain import pretraining_loop

    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        loop = pretraining_loop(_pretrain_config(spec, Path(tmp)), progress=False)
        p, steps_per_epoch = loop.p, loop.steps_per_epoch

        def epochs() -> Generator[Any]:  # batches of epoch 0, 1, ...: a small set gives enough steps too
            for epoch in itertools.count():
                yield from p.epoch_batches(epoch, 0)

        batches = epochs()

        def next_step() -> list[Any]:
            return [next(batches) for _ in range(loop.cfg.accum_steps)]

        step_batches = next_step()
        loop.train_step(step_batches)  # untimed: first-step costs (allocation, compilation, workers starting)
        device = loop.ctx.device
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):  # fresh batches: the data path's cost counts as in the run
            loop.train_step(next_step())
        synchronize(device)
        step_s = (time.perf_counter() - t0) / steps
        imgs = step_batches[0][:2]

        def fwd_bwd() -> None:
            loss = p.step_fn.loss_fn(p.model, imgs)
            loss.backward()

        flops = count_flops(fwd_bwd) / imgs.shape[0]
        p.optimizer.zero_grad(set_to_none=True)
        batches.close()  # shut the data workers down here (see _release_workers)
        _release_workers()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"step_s": step_s, "steps_per_epoch": steps_per_epoch, "flops_per_image": flops}


def _plan(sweep: Sweep, spec: RunSpec, run_dir: Path, is_main: bool) -> dict[str, Any]:
    """The run's epochs (under ``budget_s``) and FLOPs per image, measured once and kept in ``plan.json``
    (rank 0's measurement, on every rank)."""
    import json

    path = run_dir / PLAN_FILE
    if path.exists():
        return json.loads(path.read_text())
    # every rank (the steps are collective); rank 0's numbers count. Without a budget one timed step will do
    plan = _calibrate(spec, run_dir, CALIBRATION_STEPS if sweep.budget_s else 1)
    if sweep.budget_s:
        per_epoch = plan["step_s"] * plan["steps_per_epoch"]
        plan["epochs"] = max(1, math.floor(sweep.budget_s / per_epoch))
        plan["budget_s"] = sweep.budget_s
    plan = _broadcast(plan)
    if is_main:
        write_json(plan, path)
    return plan


def _broadcast(obj: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's ``obj`` on every rank (itself outside torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _release_workers() -> None:
    """Collect the finished run's objects now: a DataLoader left to a later collection may be collected inside the
    next loader's forked workers, which prints "AssertionError: can only test a child process" tracebacks."""
    import gc

    gc.collect()


def _train_tokenizer(overrides: dict[str, Any], output: Path, progress: bool) -> bool:
    """Train (or finish) a run's tokenizer in ``output``; False when a signal stopped it."""
    from maelab.config import build_config
    from maelab.methods.tokenizer import TokenizerConfig, train_tokenizer

    values = {k: v for k, v in overrides.items() if k != "config"}
    cfg = build_config(TokenizerConfig, overrides.get("config"), {**values, "output": str(output)})
    if _finished(output, cfg.epochs):
        return True
    resume = (output / "checkpoints" / "last.pt").exists()
    finished = not train_tokenizer(cfg, resume=resume, progress=progress).stopped_early
    _release_workers()
    return finished


def _run_eval(spec: EvalSpec, checkpoint: Path, output: Path, progress: bool) -> None:
    from maelab.config import build_config
    from maelab.eval.config import FinetuneConfig, KnnConfig, LinprobeConfig

    overrides = {**spec.overrides, "checkpoint": str(checkpoint), "output": str(output)}
    if spec.protocol == "knn":
        from maelab.eval.knn import run_knn

        run_knn(build_config(KnnConfig, spec.config, overrides), progress=progress)
    elif spec.protocol == "linprobe":
        from maelab.eval.linprobe import linprobe

        resume = (output / "checkpoints" / "last.pt").exists()
        linprobe(build_config(LinprobeConfig, spec.config, overrides), resume=resume, progress=progress)
    else:
        from maelab.eval.finetune import finetune

        resume = (output / "checkpoints" / "last.pt").exists()
        finetune(build_config(FinetuneConfig, spec.config, overrides), resume=resume, progress=progress)


def run_sweep(
    path: str | Path,
    output: str | Path,
    scale: str | None = None,
    data: str | None = None,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run (or continue) the sweep in ``path`` into ``output``; returns the table's rows (see :data:`COLUMNS`)."""
    from maelab.engine.distributed import is_main_process
    from maelab.engine.pretrain import pretrain

    sweep = load_sweep(path, scale, data)
    out = Path(output)
    is_main = is_main_process()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    for spec in sweep.runs:
        if only and spec.name not in only:
            continue
        run_dir = out / spec.name
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        if spec.tokenizer is not None and not _train_tokenizer(spec.tokenizer, run_dir / "tokenizer", progress):
            log.warning(
                "sweep %s stopped while training %s's tokenizer; run the same command again", sweep.name, spec.name
            )
            return collect_rows(sweep, out)
        plan = _plan(sweep, spec, run_dir, is_main)
        cfg = _pretrain_config(spec, run_dir / "pretrain", plan.get("epochs"))
        pre_dir = run_dir / "pretrain"
        if not _finished(pre_dir, cfg.epochs):
            resume = (pre_dir / "checkpoints" / "last.pt").exists()
            log.info("sweep %s: %s pre-training (%s)", sweep.name, "resuming" if resume else "starting", spec.name)
            result = pretrain(cfg, resume=resume, progress=progress)
            _release_workers()
            if result.stopped_early:  # a signal: the checkpoint is saved; the next call continues here
                log.warning("sweep %s stopped during %s; run the same command again to continue", sweep.name, spec.name)
                return collect_rows(sweep, out)
        for ev in spec.evals:
            ev_dir = run_dir / ev.protocol
            if (ev_dir / "eval.json").exists():
                continue
            log.info("sweep %s: %s of %s", sweep.name, ev.protocol, spec.name)
            _run_eval(ev, pre_dir, ev_dir, progress)
            _release_workers()
        if is_main:
            write_sweep(sweep, out)
    rows = collect_rows(sweep, out)
    if is_main:
        write_sweep(sweep, out)
    return rows


# ------------------------------------------------------------------------------------------ the table
def collect_rows(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """One row per run from what its directories hold (missing parts are None)."""
    import json

    from maelab.engine.metrics import read_records

    rows = []
    for spec in sweep.runs:
        run_dir = out / spec.name
        records = read_records(run_dir / "pretrain" / "metrics.jsonl")
        plan_path = run_dir / PLAN_FILE
        plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
        overrides = {k: v for k, v in spec.own.items() if k not in ("config", "method")}
        row: dict[str, Any] = {
            "run": spec.name,
            "method": _run_method(run_dir / "pretrain", spec),
            "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()),
            "epochs": records[-1]["epoch"] if records else None,
            "pretrain_s": _seconds(records),
            "img_per_s": (sum(r["img_per_s"] for r in records) / len(records)) if records else None,
            "gflops_per_img": plan["flops_per_image"] / 1e9 if "flops_per_image" in plan else None,
            "final_loss": records[-1].get("loss") if records else None,
            "tokenizer_s": _seconds(read_records(run_dir / "tokenizer" / "metrics.jsonl")),
        }
        for protocol in PROTOCOLS:
            ev = run_dir / protocol / "eval.json"
            row[f"{protocol}_top1"] = json.loads(ev.read_text())["metrics"].get("top1") if ev.exists() else None
        rows.append(row)
    return rows


def _run_method(run_dir: Path, spec: RunSpec) -> str:
    """The method a run trains: its ``config.yaml``'s (set by a recipe or an override), else the sweep's."""
    written = run_dir / "config.yaml"
    if written.is_file():
        method = (yaml.safe_load(written.read_text()) or {}).get("method")
        if method:
            return str(method)
    return str(spec.pretrain.get("method", "mae"))


def _seconds(records: list[dict[str, Any]]) -> float | None:
    """Summed ``epoch_time_s`` of a run's records (None without records)."""
    return sum(r.get("epoch_time_s", 0.0) for r in records) if records else None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_markdown(sweep: Sweep, rows: Sequence[dict[str, Any]]) -> str:
    header = [h for _, h in COLUMNS]
    lines = [f"# Sweep: {sweep.name}", "", f"From `{sweep.source}`." if sweep.source else "", ""]
    if sweep.budget_s:
        lines += [f"Equal pre-training budget: {sweep.budget_s:g} s per run (epochs set from timed steps).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def save_sweep_figure(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Top-1 of each evaluation per run (grouped bars), and pre-training seconds; None when nothing is evaluated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from maelab.viz.reconstruction import _atomic_savefig

    metrics = [k for k in ("knn_top1", "linprobe_top1", "finetune_top1") if any(r.get(k) is not None for r in rows)]
    if not metrics:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(metrics)
    for i, key in enumerate(metrics):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r.get(key) or 0.0 for r in rows], width, label=key.replace("_top1", ""))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["run"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    fig.tight_layout()
    return _atomic_savefig(fig, path)


def write_sweep(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """``sweep.json``, ``sweep.csv``, ``sweep.md`` and ``sweep.png`` in ``out`` (atomically)."""
    rows = collect_rows(sweep, out)
    write_json(
        {"name": sweep.name, "source": str(sweep.source), "budget_s": sweep.budget_s, "rows": rows}, out / "sweep.json"
    )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for k, _ in COLUMNS])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "sweep.csv", buf.getvalue().encode())
    atomic_write(out / "sweep.md", format_markdown(sweep, rows).encode())
    save_sweep_figure(rows, out / "sweep.png")
    for fig in sweep.figures:
        save_setting_figure(sweep, fig, rows, out / fig.file)
    return rows


def save_setting_figure(sweep: Sweep, fig_spec: FigureSpec, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Top-1 of each evaluation against the setting ``fig_spec.x`` over ``fig_spec.runs`` (runs not yet evaluated
    are left out); None when none is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from maelab.viz.reconstruction import _atomic_savefig

    by_name = {r["run"]: r for r in rows}
    specs = {s.name: s for s in sweep.runs}
    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for key in ("finetune_top1", "linprobe_top1", "knn_top1"):
        points = sorted(
            (float(specs[n].pretrain[fig_spec.x]), by_name[n][key])
            for n in fig_spec.runs
            if fig_spec.x in specs[n].pretrain and by_name[n].get(key) is not None
        )
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=key.replace("_top1", ""))
            for x, y in points:
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel(fig_spec.x)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(fig_spec.title or f"{sweep.name}: top-1 vs {fig_spec.x}")
    ax.legend()
    fig.tight_layout()
    return _atomic_savefig(fig, path)
