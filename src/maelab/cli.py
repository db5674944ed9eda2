"""``maelab <command>``: pretrain, shard, finetune, linprobe, knn, embed, visualize, compare, report, export, models, bench.

Every user mistake ends with one line on stderr (``maelab: error: ...``) and exit code 2;
internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from maelab.engine.launch import adopt_slurm_launch
from maelab.errors import MaelabError

EXIT_USER_ERROR = 2


# ---------------------------------------------------------------------------------- helpers
def _common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Map explicit command-line flags onto dotted config keys (flags beat the YAML file)."""
    from maelab.config import parse_override

    mapping = {
        "data": "data.name",
        "data_root": "data.root",
        "model": "model",
        "epochs": "epochs",
        "batch_size": "batch_size",
        "output": "output",
        "device": "device",
        "seed": "seed",
        "num_workers": "data.num_workers",
        "lr": "lr",
        "base_lr": "base_lr",
        "accum_steps": "accum_steps",
        "mask_ratio": "model_args.mask_ratio",
        "precision": "precision",
        "compile": "compile",
        "compile_mode": "compile_mode",
        "fp8": "fp8",
        "init": "init",
        "init_encoder": "init_encoder",
    }
    out: dict[str, Any] = {}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    if getattr(args, "download", False):
        out["data.download"] = True
    if getattr(args, "strict_data", False):
        out["data.strict"] = True
    if getattr(args, "norm_pix_loss", False):
        out["model_args.norm_pix_loss"] = True
    for text in getattr(args, "overrides", []) or []:
        key, value = parse_override(text)
        out[key] = value
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.add_argument("--data", help="synthetic, cifar10, cifar100, stl10, or an image folder")
    p.add_argument("--data-root", help="local root for torchvision datasets")
    p.add_argument("--download", action="store_true", help="allow torchvision datasets to download")
    p.add_argument("--strict-data", action="store_true", help="fail on the first unreadable image")
    p.add_argument("--model", help="preset name (maelab models)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per-device batch size")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="absolute peak lr (overrides base_lr)")
    p.add_argument("--base-lr", type=float, help="lr = base_lr * effective_batch / 256")
    p.add_argument("--output", help="run directory")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model_args.norm_pix_loss=true data.num_workers=8",
    )


def _add_speed_flags(p: argparse.ArgumentParser) -> None:
    from maelab.config import COMPILE_MODES, FP8_RECIPES

    p.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const="on",
        default=None,
        help="torch.compile the model (default: on for CUDA, off on CPU)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="run eagerly")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--fp8", choices=FP8_RECIPES, help="opt-in float8 Linear layers via torchao (Ada/Hopper GPUs)")


# ---------------------------------------------------------------------------------- commands
def cmd_pretrain(args: argparse.Namespace) -> int:
    from maelab.config import PretrainConfig, build_config
    from maelab.engine.distributed import close_process_group, is_main_process
    from maelab.engine.pretrain import pretrain

    if args.resume and (args.init or args.init_encoder):
        from maelab.errors import ConfigError

        flag = "--init" if args.init else "--init-encoder"
        raise ConfigError(
            f"{flag} starts a new run from weights, --resume continues the run in --output: pass one of them"
        )
    cfg = build_config(PretrainConfig, args.config, _common_overrides(args))
    result = pretrain(cfg, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps)
    close_process_group()
    state = "stopped (resume with --resume)" if result.stopped_early else "finished"
    if is_main_process():
        print(
            f"{state}: epoch {result.epoch}/{cfg.epochs}, step {result.step}, loss {result.final_loss:.4f}; "
            f"outputs in {result.output}"
        )
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from maelab.data.shards import write_shards

    index = write_shards(args.data, args.output, args.shard_size)
    print(
        f"wrote {index['num_samples']} images in {len(index['shards'])} shards to {args.output} "
        f"(index.json; pre-train with --data {args.output})"
    )
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from maelab.viz.visualize import visualize_images

    path = visualize_images(
        args.checkpoint,
        args.images,
        args.output,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        device=args.device or "auto",
        max_images=args.max_images,
    )
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from maelab.viz.compare import format_summary, load_run, save_comparison, summarize_run

    runs = [load_run(d) for d in args.runs]
    if args.labels and len(args.labels) != len(runs):
        from maelab.errors import ConfigError

        raise ConfigError(f"invalid --labels: {len(args.labels)} names for {len(runs)} runs; give one per run")
    names = [r["name"] for r in runs]
    for run, label in zip(runs, args.labels or []):
        run["name"] = label
    if not args.labels and len(set(names)) < len(names):  # same folder names: use the paths
        for run in runs:
            run["name"] = run["path"]
    rows = [summarize_run(r) for r in runs]
    print(format_summary(rows))
    path = save_comparison(runs, args.output)
    print(f"wrote {path}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from maelab.viz.report import write_report

    print(f"wrote {write_report(args.run_dir, args.output)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from maelab.engine.checkpoint import load_pretrained
    from maelab.models.weights import export_encoder

    model = load_pretrained(args.checkpoint, need_decoder=args.format == "hf" and not args.encoder_only)
    if args.format == "hf":
        from maelab.models.hf import save_hf

        out = save_hf(model, args.output or ("hf_encoder" if args.encoder_only else "hf_mae"), args.encoder_only)
        cls = "ViTModel" if args.encoder_only else "ViTMAEForPreTraining"
        print(f"wrote {out}\nload it with: transformers.{cls}.from_pretrained({str(out)!r})")
        return 0
    path = export_encoder(model, args.output or "encoder.safetensors")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in model.cfg.timm_kwargs().items() if k != "num_classes")
    print(
        f"wrote {path}\nload it with: maelab.models.weights.load_exported_encoder({str(path)!r})\n"
        f"or: timm.create_model({model.cfg.timm_name!r}, pretrained=True, num_classes=N, {kwargs}, "
        f"pretrained_cfg_overlay=dict(file={str(path)!r}))"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from maelab.models.registry import DESCRIPTIONS, get_config, list_models

    rows = []
    for name in list_models():
        cfg = get_config(name)
        enc = _vit_params(cfg.embed_dim, cfg.depth, cfg.mlp_ratio) + cfg.patch_size**2 * cfg.in_chans * cfg.embed_dim
        dec = _vit_params(cfg.decoder_embed_dim, cfg.decoder_depth, cfg.mlp_ratio)
        rows.append(
            (name, f"{cfg.img_size}", f"{cfg.patch_size}", f"{enc / 1e6:.1f}M", f"{dec / 1e6:.1f}M", DESCRIPTIONS[name])
        )
    header = ("name", "img", "patch", "encoder", "decoder", "description")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _vit_params(dim: int, depth: int, mlp_ratio: float) -> int:
    hidden = int(dim * mlp_ratio)
    per_block = 4 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + dim * hidden + hidden + hidden * dim + dim
    return depth * per_block


def cmd_bench(args: argparse.Namespace) -> int:
    from maelab.bench.run import run_bench

    run_bench(
        model=args.model,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device or "auto",
        precision=args.precision or "auto",
        compile=args.compile or "auto",
        compile_mode=args.compile_mode or "default",
        fp8=args.fp8 or "off",
        variants=_split(args.variants),
        batch_sizes=[int(b) for b in _split(args.batch_sizes)] or None,
        reference=not args.no_reference,
        json_path=args.json,
        model_args=_model_args(args.overrides),
        data=args.data,
        num_workers=args.num_workers,
        gpu_resident=args.gpu_resident,
        data_args={"decode": args.decode} if args.decode else None,
    )
    return 0


def _split(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _model_args(texts: list[str] | None) -> dict[str, Any]:
    from maelab.config import parse_override

    out = {}
    for text in texts or []:
        key, value = parse_override(text)
        out[key.removeprefix("model_args.")] = value
    return out


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maelab", description="Masked Autoencoder pre-training for ViTs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("pretrain", help="MAE pre-training (built-in synthetic data by default)")
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt")
    p.add_argument(
        "--init",
        help="start from these MAE weights, decoder included (Hugging Face directory, "
        "official full .pth, maelab .pt or run directory); a new run, not a resume",
    )
    p.add_argument(
        "--init-encoder",
        help="start the encoder from a timm ViT state dict (.safetensors or .pth) "
        "of the same architecture; the decoder starts fresh",
    )
    p.add_argument("--mask-ratio", type=float)
    p.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalized pixel target")
    _add_speed_flags(p)
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("shard", help="write an image folder as WebDataset tar shards (+ index.json)")
    p.add_argument("--data", required=True, help="image folder (ImageFolder classes become the cls field)")
    p.add_argument("--output", required=True, help="directory for shard-NNNNNN.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("visualize", help="reconstruct your own images from a checkpoint")
    p.add_argument(
        "--checkpoint", required=True, help="run directory, maelab .pt, official .pth, Hugging Face directory"
    )
    p.add_argument("--images", required=True, nargs="+", help="image files or folders")
    p.add_argument("--output", default="reconstructions.png")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("compare", help="compare pre-training runs: loss curves, kNN, throughput")
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument(
        "--labels",
        help="comma-separated names for the runs (default: folder names)",
        type=lambda t: [x.strip() for x in t.split(",")],
    )
    p.add_argument("--output", default="comparison.png")
    p.add_argument("--json", help="also write the summary rows as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page about a run (curves, reconstructions, evals)",
        description="Write one HTML file that opens offline (charts, images and data embedded): "
        "status and key numbers, loss/lr/throughput curves, kNN top-1 when logged, the "
        "reconstruction grids of every epoch, evaluation results, the resolved config and the "
        "environment. Works on a finished run and on one still running. Evaluations: every "
        "eval.json at most 3 folder levels below RUN_DIR's parent folder (RUN_DIR itself, its "
        "subfolders, sibling folders and theirs) whose checkpoint is RUN_DIR or a file inside it.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="pre-training run directory (the --output of maelab pretrain)")
    p.add_argument("--output", help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export the encoder for timm, or the MAE for Hugging Face transformers")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, maelab .pt, official .pth, Hugging Face directory, exported .safetensors",
    )
    p.add_argument(
        "--format",
        choices=["timm", "hf"],
        default="timm",
        help="timm: the encoder as one .safetensors file; hf: a directory for from_pretrained",
    )
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="hf: the encoder alone, for ViTModel / ViTMAEModel (timm exports are always encoder-only)",
    )
    p.add_argument("--output", help="default: encoder.safetensors (timm), hf_mae or hf_encoder (hf)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list model presets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="train-step throughput, memory and FLOPs (vs Hugging Face ViTMAE)")
    p.add_argument("--model", default=None, help="preset (default: mae_vit_base_patch16 on CUDA, pico on CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--batch-sizes", help="comma list: measure each (OOM is reported, not fatal), e.g. 256,512,1024")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    _add_speed_flags(p)
    p.add_argument(
        "--variants",
        help="comma list of ablations to time besides the default path: "
        "eager, eager-foreach-adamw, eager-host-sync, compile, compile-cudagraphs, compile-autotune, "
        "fp8, fp8-rowwise, fp8-cudagraphs",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the Hugging Face reference")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--data", help="also time the data loader and the end-to-end loop on this dataset")
    p.add_argument("--num-workers", type=int, help="DataLoader workers for --data")
    p.add_argument(
        "--gpu-resident", choices=["auto", "on", "off"], default="auto", help="GPU-resident data path for --data"
    )
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], help="JPEG decoding for --data folders")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model overrides, e.g. mask_ratio=0.9")
    p.set_defaults(func=cmd_bench)

    from maelab.eval.cli import add_eval_commands

    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere, also between flags
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        adopt_slurm_launch()  # before the config: it reads WORLD_SIZE and RANK
        return func(args)
    except MaelabError as e:
        print(f"maelab: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("maelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
