"""``maelab finetune | linprobe | knn | embed``: :func:`add_eval_commands` registers them on the main parser.

Each command reads an optional YAML recipe (``--config``), applies the explicit flags (generated from its config
class, :func:`maelab.cli.add_config_flags`) and ``key=value`` overrides on top, runs, writes ``eval.json``
(metrics, encoder source, config) into ``--output`` (embed: the features file ``--output`` and its file list) and
prints a one-line summary. User mistakes raise :class:`~maelab.errors.MaelabError` subclasses, which the main CLI
prints as one line.

All of them run under ``torchrun`` too (e.g. ``torchrun --nproc_per_node 8 -m maelab finetune ...``):
``--batch-size`` is then per process, only rank 0 writes outputs and prints the summary, and
the process group is closed when the command is done.
"""

from __future__ import annotations

import argparse
from typing import Any

from maelab.cli import DATA_FLAGS, Alias, add_config_flags, run_command
from maelab.eval.config import EmbedConfig, FinetuneConfig, KnnConfig, LinprobeConfig


def _top5(m: dict[str, Any]) -> str:
    return f", top-5 {m['top5']:.2f}" if "top5" in m else ""


# ---------------------------------------------------------------------------------- commands
def cmd_finetune(args: argparse.Namespace) -> int:
    from maelab.eval.finetune import finetune

    def summary(cfg: FinetuneConfig, result: Any) -> str:
        m = result.metrics
        ema = f", EMA top-1 {m['ema_top1']:.2f}" if "ema_top1" in m else ""
        return (
            f"finetune finished: epoch {result.epoch}/{cfg.epochs}, top-1 {m.get('top1', float('nan')):.2f}"
            f"{_top5(m)}{ema} (best {m['best_top1']:.2f} at epoch {m['best_epoch']}); eval.json in {result.output}"
        )

    return run_command(
        args, FinetuneConfig, lambda cfg: finetune(cfg, resume=args.resume, progress=not args.no_progress), summary
    )


def cmd_linprobe(args: argparse.Namespace) -> int:
    from maelab.eval.linprobe import linprobe

    def summary(cfg: LinprobeConfig, result: Any) -> str:
        m = result.metrics
        what = "linear probe" if cfg.train_blocks == 0 else f"partial fine-tune ({cfg.train_blocks} blocks)"
        return (
            f"{what} finished{' on cached features' if cfg.uses_cache else ''}: top-1 {m['top1']:.2f}{_top5(m)} "
            f"(best {m['best_top1']:.2f} at epoch {m['best_epoch']}); eval.json in {result.output}"
        )

    return run_command(
        args, LinprobeConfig, lambda cfg: linprobe(cfg, resume=args.resume, progress=not args.no_progress), summary
    )


def cmd_knn(args: argparse.Namespace) -> int:
    from maelab.eval.knn import run_knn

    def summary(cfg: KnnConfig, result: Any) -> str:
        m = result.metrics
        return (
            f"kNN (k={cfg.k}, T={cfg.temperature}, {cfg.pool} features): top-1 {m['top1']:.2f}{_top5(m)}; "
            f"eval.json in {result.output}"
        )

    return run_command(args, KnnConfig, lambda cfg: run_knn(cfg, progress=not args.no_progress), summary)


def cmd_embed(args: argparse.Namespace) -> int:
    from maelab.eval.embed import embed, sidecar

    def summary(cfg: EmbedConfig, path: Any) -> str:
        return f"embed ({cfg.pool} features): wrote {path} and {sidecar(path, 'files.txt')}"

    return run_command(args, EmbedConfig, lambda cfg: embed(cfg, progress=not args.no_progress), summary)


# ---------------------------------------------------------------------------------- parser
def add_eval_commands(sub: Any) -> None:
    """Register ``finetune``, ``linprobe``, ``knn`` and ``embed`` on an argparse subparsers object."""
    commands: list[tuple[str, str, type, Any, tuple[Alias, ...]]] = [
        (
            "finetune",
            "fine-tune a pre-trained encoder (paper recipe: layer decay, mixup, ...)",
            FinetuneConfig,
            cmd_finetune,
            (),
        ),
        (
            "linprobe",
            "linear probe (BN + linear head) on frozen features, or partial fine-tuning",
            LinprobeConfig,
            cmd_linprobe,
            (Alias("--no-cache", "cache_features", False),),
        ),
        ("knn", "weighted kNN accuracy of frozen features (k=20, T=0.07)", KnnConfig, cmd_knn, ()),
        ("embed", "frozen features of every image of a folder, to .safetensors or .npy", EmbedConfig, cmd_embed, ()),
    ]
    for name, help_text, cls, func, extra in commands:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML recipe (see recipes/)")
        add_config_flags(p, cls, (*DATA_FLAGS, *extra))
        if name in ("finetune", "linprobe"):
            p.add_argument(
                "--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt"
            )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=func)
