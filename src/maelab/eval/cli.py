"""``maelab finetune | linprobe | knn | embed``: :func:`add_eval_commands` registers them on the main parser.

Each command reads an optional YAML recipe (``--config``), applies the explicit flags and
``key=value`` overrides on top, runs, writes ``eval.json`` (metrics, encoder source, config)
into ``--output`` (embed: the features file ``--output`` and its file list) and prints a one-line
summary. User mistakes raise :class:`~maelab.errors.MaelabError` subclasses, which the main CLI
prints as one line.

All of them run under ``torchrun`` too (e.g. ``torchrun --nproc_per_node 8 -m maelab finetune ...``):
``--batch-size`` is then per process, only rank 0 writes outputs and prints the summary, and
the process group is closed when the command is done.
"""

from __future__ import annotations

import argparse
from typing import Any

from maelab.engine.distributed import close_process_group, is_main_process

FLAG_KEYS = {
    # attribute: dotted config key
    "checkpoint": "checkpoint",
    "model": "model",
    "data": "data.name",
    "data_root": "data.root",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "accum_steps": "accum_steps",
    "lr": "lr",
    "base_lr": "base_lr",
    "output": "output",
    "device": "device",
    "precision": "precision",
    "seed": "seed",
    "num_workers": "data.num_workers",
    "pool": "pool",
    "train_blocks": "train_blocks",
    "layer_decay": "layer_decay",
    "drop_path": "drop_path",
    "optimizer": "optimizer",
    "k": "k",
    "temperature": "temperature",
}
SWITCH_KEYS = {
    # store_true attribute: (dotted key, value)
    "download": ("data.download", True),
    "strict_data": ("data.strict", True),
    "from_scratch": ("from_scratch", True),
    "ema": ("ema", True),
    "no_augment": ("augment", False),
    "no_cache": ("cache_features", False),
}


def eval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags and ``key=value`` overrides as dotted config keys (they beat the YAML file)."""
    from maelab.config import parse_override

    out: dict[str, Any] = {}
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    for attr, (key, value) in SWITCH_KEYS.items():
        if getattr(args, attr, False):
            out[key] = value
    for text in getattr(args, "overrides", None) or []:
        key, value = parse_override(text)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------- commands
def cmd_finetune(args: argparse.Namespace) -> int:
    from maelab.config import build_config
    from maelab.eval.config import FinetuneConfig
    from maelab.eval.finetune import finetune

    cfg = build_config(FinetuneConfig, args.config, eval_overrides(args))
    result = finetune(cfg, resume=args.resume, progress=not args.no_progress)
    close_process_group()
    if not is_main_process():
        return 0
    m = result.metrics
    top5 = f", top-5 {m['top5']:.2f}" if "top5" in m else ""
    ema = f", EMA top-1 {m['ema_top1']:.2f}" if "ema_top1" in m else ""
    print(
        f"finetune finished: epoch {result.epoch}/{cfg.epochs}, top-1 {m.get('top1', float('nan')):.2f}{top5}{ema} "
        f"(best {m['best_top1']:.2f} at epoch {m['best_epoch']}); eval.json in {result.output}"
    )
    return 0


def cmd_linprobe(args: argparse.Namespace) -> int:
    from maelab.config import build_config
    from maelab.eval.config import LinprobeConfig
    from maelab.eval.linprobe import linprobe

    cfg = build_config(LinprobeConfig, args.config, eval_overrides(args))
    result = linprobe(cfg, progress=not args.no_progress)
    close_process_group()
    if not is_main_process():
        return 0
    m = result.metrics
    top5 = f", top-5 {m['top5']:.2f}" if "top5" in m else ""
    what = "linear probe" if cfg.train_blocks == 0 else f"partial fine-tune ({cfg.train_blocks} blocks)"
    print(
        f"{what} finished{' on cached features' if result.cached else ''}: top-1 {m['top1']:.2f}{top5} "
        f"(best {m['best_top1']:.2f} at epoch {m['best_epoch']}); eval.json in {result.output}"
    )
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from maelab.config import build_config
    from maelab.eval.config import KnnConfig
    from maelab.eval.knn import run_knn

    cfg = build_config(KnnConfig, args.config, eval_overrides(args))
    result = run_knn(cfg, progress=not args.no_progress)
    close_process_group()
    if not is_main_process():
        return 0
    m = result.metrics
    top5 = f", top-5 {m['top5']:.2f}" if "top5" in m else ""
    print(
        f"kNN (k={cfg.k}, T={cfg.temperature}, {cfg.pool} features): top-1 {m['top1']:.2f}{top5}; "
        f"eval.json in {result.output}"
    )
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from maelab.config import build_config
    from maelab.eval.config import EmbedConfig
    from maelab.eval.embed import embed, sidecar

    cfg = build_config(EmbedConfig, args.config, eval_overrides(args))
    path = embed(cfg, progress=not args.no_progress)
    close_process_group()
    if not is_main_process():
        return 0
    print(f"embed ({cfg.pool} features): wrote {path} and {sidecar(path, 'files.txt')}")
    return 0


# ---------------------------------------------------------------------------------- parser
_SOURCE_HELP = (
    "pre-trained weights: a pre-training run directory, a maelab .pt, an official MAE .pth, "
    "or an encoder exported by `maelab export` (.safetensors)"
)


def _add_shared(
    p: argparse.ArgumentParser,
    batch_help: str = "per-device (per-process) batch size",
    output_help: str = "output directory (eval.json, metrics.jsonl, checkpoints/)",
) -> None:
    p.add_argument("--config", help="YAML recipe (see recipes/finetune_*.yaml, linprobe_*.yaml, knn_*.yaml)")
    p.add_argument("--checkpoint", help=_SOURCE_HELP)
    p.add_argument("--model", help="preset name; with --checkpoint it is checked against the checkpoint")
    p.add_argument("--data", help="synthetic, cifar10, cifar100, stl10, or a labeled image folder")
    p.add_argument("--data-root", help="local root for torchvision datasets")
    p.add_argument("--download", action="store_true", help="allow torchvision datasets to download")
    p.add_argument("--strict-data", action="store_true", help="fail on the first unreadable image")
    p.add_argument("--pool", choices=["avg", "cls"], help="feature pooling: global average or class token")
    p.add_argument("--batch-size", type=int, help=batch_help)
    p.add_argument("--output", help=output_help)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. warmup_epochs=5 data.num_workers=8 "
    )


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="absolute peak lr (overrides base_lr)")
    p.add_argument("--base-lr", type=float, help="lr = base_lr * effective_batch / 256")
    p.add_argument(
        "--train-blocks",
        type=int,
        metavar="K",
        help="partial fine-tuning: tune only the last K blocks (+ head); 0 = linear probe",
    )


def add_eval_commands(sub: Any) -> None:
    """Register ``finetune``, ``linprobe``, ``knn`` and ``embed`` on an argparse subparsers object."""
    p = sub.add_parser("finetune", help="fine-tune a pre-trained encoder (paper recipe: layer decay, mixup, ...)")
    _add_shared(p)
    _add_training(p)
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="random init instead of a checkpoint (the supervised baseline; pick --model)",
    )
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay (paper: 0.75; 1.0 = off)")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate")
    p.add_argument("--ema", action="store_true", help="also keep and evaluate an EMA of the weights")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("linprobe", help="linear probe (BN + linear head) on frozen features, or partial fine-tuning")
    _add_shared(p)
    _add_training(p)
    p.add_argument("--optimizer", choices=["lars", "sgd", "adamw"], help="head optimizer (paper: lars)")
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="no training augmentation: features are extracted once and cached (fast)",
    )
    p.add_argument("--no-cache", action="store_true", help="never cache features (stream images every step)")
    p.set_defaults(func=cmd_linprobe)

    p = sub.add_parser("knn", help="weighted kNN accuracy of frozen features (k=20, T=0.07)")
    _add_shared(p, batch_help="images per feature-extraction batch")
    p.add_argument("--k", type=int, help="neighbours (default 20)")
    p.add_argument("--temperature", type=float, help="vote weight exp(similarity / T) (default 0.07)")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("embed", help="frozen features of every image of a folder, to .safetensors or .npy")
    _add_shared(
        p,
        batch_help="images per batch (per process)",
        output_help="features file, .safetensors or .npy (+ <stem>.files.txt, <stem>.skipped.txt)",
    )
    p.set_defaults(func=cmd_embed)
