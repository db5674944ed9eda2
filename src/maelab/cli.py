"""``maelab <command>``: pretrain, tokenizer, shard, finetune, linprobe, knn, embed, visualize, compare, report,
export, models, bench.

The protocol commands' flags are generated from their config dataclasses (:func:`add_config_flags`):
``--field-name`` for each top-level field, with the field's doc string as help, a few aliases for nested keys
(``--data`` -> ``data.name``) and ``key=value`` for any key.

Every user mistake ends with one line on stderr (``maelab: error: ...``) and exit code 2;
internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin

from maelab.config import (
    DECODE_MODES,
    SWITCHES,
    ModelConfig,
    PretrainConfig,
    build_config,
    field_docs,
    field_types,
    parse_override,
)
from maelab.engine.launch import adopt_slurm_launch
from maelab.errors import MaelabError
from maelab.methods.tokenizer import TokenizerConfig, train_tokenizer

EXIT_USER_ERROR = 2
C = TypeVar("C")
R = TypeVar("R")


# ---------------------------------------------------------------------------------- config flags
@dataclass(frozen=True)
class Alias:
    """A flag for a nested config key (``--data`` -> ``data.name``), or a switch setting a key to ``value``."""

    flag: str
    key: str
    value: Any = None


DATA_FLAGS = (
    Alias("--data", "data.name"),
    Alias("--data-root", "data.root"),
    Alias("--num-workers", "data.num_workers"),
    Alias("--download", "data.download", True),
    Alias("--strict-data", "data.strict", True),
)
"""The nested flags of every protocol."""
PRETRAIN_FLAGS = (
    *DATA_FLAGS,
    Alias("--mask-ratio", "model_args.mask_ratio"),
    Alias("--norm-pix-loss", "model_args.norm_pix_loss", True),
)


def _yaml_value(text: str) -> Any:
    """A flag's value parsed as in ``key=value`` (``--num-workers auto``, ``--img-size [224,192]``)."""
    return parse_override(f"flag={text}")[1]


def _field(cls: type, key: str) -> tuple[Any, str, tuple[str, ...] | None]:
    """(type annotation, doc string, allowed values) of the dotted config ``key`` of ``cls``."""
    *sections, name = key.split(".")
    for section in sections:
        cls = ModelConfig if section == "model_args" else field_types(cls)[section]
    f = next(f for f in fields(cls) if f.name == name)
    return field_types(cls)[name], field_docs(cls).get(name, ""), f.metadata.get("choices")


def add_field_flag(p: argparse.ArgumentParser, cls: type, key: str, alias: Alias | None = None) -> str:
    """Add the flag of config ``key`` of ``cls`` (``--field-name``, or ``alias``) with the field's doc string as
    help; returns its dest (the dotted key). Booleans get ``--x/--no-x``, auto/on/off fields ``--x/--no-x`` for
    on/off, enumerations their choices, numbers and strings their type; other values parse as YAML."""
    annotation, doc, choices = _field(cls, key)
    doc = doc.replace("%", "%%")
    if alias is not None and alias.value is not None:
        help_text = f"{key}={str(alias.value).lower()}: {doc}"
        p.add_argument(alias.flag, dest=key, action="store_const", const=alias.value, default=None, help=help_text)
        return key
    flag = alias.flag if alias else "--" + key.replace("_", "-")
    help_text = f"{key}: {doc}" if alias else doc
    options = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) not in (Union, types.UnionType):
        options = [annotation]
    if choices == SWITCHES:
        p.add_argument(flag, dest=key, action="store_const", const="on", default=None, help=help_text)
        off = "--no-" + flag.removeprefix("--")
        p.add_argument(off, dest=key, action="store_const", const="off", help=f"{key}=off")
    elif options == [bool]:
        p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif choices:
        p.add_argument(flag, dest=key, choices=choices, help=help_text)
    else:
        kind = options[0] if len(options) == 1 and options[0] in (int, float, str) else _yaml_value
        p.add_argument(flag, dest=key, type=kind, metavar=key.rsplit(".", 1)[-1].upper(), help=help_text)
    return key


def add_config_flags(p: argparse.ArgumentParser, cls: type, aliases: tuple[Alias, ...] = DATA_FLAGS) -> None:
    """Flags generated from config ``cls``: ``--field-name`` for each top-level field but the nested sections
    (data, model_args), the ``aliases`` for nested keys, and ``key=value`` overrides for every key.
    :func:`config_overrides` reads them back."""
    hints = field_types(cls)
    keys = [f.name for f in fields(cls) if not (is_dataclass(hints[f.name]) or get_origin(hints[f.name]) is dict)]
    dests = {add_field_flag(p, cls, key) for key in keys}
    dests |= {add_field_flag(p, cls, a.key, a) for a in aliases}
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides of any key, e.g. warmup_epochs=5 data.num_workers=8 model_args.norm_pix_loss=true",
    )
    p.set_defaults(config_keys=tuple(sorted(dests)))


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags given on the command line, then the ``key=value`` overrides, as dotted config keys (both
    beat the YAML recipe; a key=value beats a flag)."""
    out = {key: getattr(args, key) for key in args.config_keys if getattr(args, key) is not None}
    for text in args.overrides or []:
        key, value = parse_override(text)
        out[key] = value
    return out


def run_command(args: argparse.Namespace, cls: type[C], run: Callable[[C], R], summary: Callable[[C, R], str]) -> int:
    """The shape of every protocol command: build ``cls`` from ``--config``, the flags and ``key=value``; run it on
    every process (under torchrun); close the process group; the main process prints ``summary``."""
    from maelab.engine.distributed import close_process_group, is_main_process

    cfg = build_config(cls, args.config, config_overrides(args))
    result = run(cfg)
    close_process_group()
    if is_main_process():
        print(summary(cfg, result))
    return 0


# ---------------------------------------------------------------------------------- commands
def cmd_pretrain(args: argparse.Namespace) -> int:
    from maelab.engine.pretrain import pretrain

    if args.resume and (args.init or args.init_encoder):
        from maelab.errors import ConfigError

        flag = "--init" if args.init else "--init-encoder"
        raise ConfigError(
            f"{flag} starts a new run from weights, --resume continues the run in --output: pass one of them"
        )

    def summary(cfg: PretrainConfig, result: Any) -> str:
        state = "stopped (resume with --resume)" if result.stopped_early else "finished"
        return (
            f"{state}: epoch {result.epoch}/{cfg.epochs}, step {result.step}, loss {result.final_loss:.4f}; "
            f"outputs in {result.output}"
        )

    return run_command(
        args,
        PretrainConfig,
        lambda cfg: pretrain(cfg, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps),
        summary,
    )


def cmd_tokenizer(args: argparse.Namespace) -> int:
    def summary(cfg: TokenizerConfig, result: Any) -> str:
        state = "stopped (resume with --resume)" if result.stopped_early else "finished"
        return (
            f"{state}: epoch {result.epoch}/{cfg.epochs}, step {result.step}, loss {result.final_loss:.4f}; "
            f"tokenizer in {result.output} (BEiT: method_args.tokenizer={result.output})"
        )

    return run_command(
        args,
        TokenizerConfig,
        lambda cfg: train_tokenizer(cfg, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps),
        summary,
    )


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
        from maelab.io import write_json

        write_json(rows, args.json)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from maelab.engine.distributed import close_process_group, is_main_process
    from maelab.sweep import format_markdown, load_sweep, run_sweep

    rows = run_sweep(
        args.sweep, args.output, scale=args.scale, data=args.data, progress=not args.no_progress, only=args.only
    )
    close_process_group()
    if is_main_process():
        print(format_markdown(load_sweep(args.sweep, args.scale, args.data), rows))
        print(f"wrote {args.output}/sweep.md, sweep.csv, sweep.json, sweep.png")
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
        from maelab.errors import CheckpointError
        from maelab.models.hf import save_hf
        from maelab.models.mae import MaskedAutoencoder

        if model.cfg.encoder != "vit":
            raise CheckpointError(
                f"{args.checkpoint}: a {model.cfg.encoder} encoder, and the Hugging Face export writes ViTs (ViTMAE, "
                "ViTModel): export it for timm instead (no --format)"
            )
        if not (args.encoder_only or isinstance(model, MaskedAutoencoder)):
            raise CheckpointError(
                f"{args.checkpoint}: not an MAE run, and Hugging Face's ViTMAEForPreTraining holds an MAE: add "
                "--encoder-only (a ViTModel) or export the encoder for timm (no --format)"
            )

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
        dec = f"{_vit_params(cfg.decoder_embed_dim, cfg.decoder_depth, cfg.mlp_ratio) / 1e6:.1f}M"
        rows.append(
            (
                name,
                cfg.encoder,
                f"{cfg.img_size}",
                f"{cfg.patch_size}",
                f"{_encoder_params(cfg) / 1e6:.1f}M",
                dec if cfg.encoder == "vit" else "-",
                DESCRIPTIONS[name],
            )
        )
    header = ("name", "kind", "img", "patch", "encoder", "MAE decoder", "description")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _encoder_params(cfg: Any) -> int:
    """Trained parameters of the preset's timm encoder (a ViT's fixed sin-cos ``pos_embed`` left out), counted on
    the meta device (nothing is allocated)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(cfg.timm_name, **cfg.timm_kwargs())
    return sum(p.numel() for name, p in model.named_parameters() if name != "pos_embed")


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

    p = sub.add_parser(
        "pretrain", help="masked-image pre-training: MAE by default, --method simmim/maskfeat/beit/ae/vae"
    )
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    add_config_flags(p, PretrainConfig, PRETRAIN_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt")
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("tokenizer", help="train a VQ-VAE visual tokenizer: BEiT's targets (method_args.tokenizer)")
    p.add_argument("--config", help="YAML recipe (see recipes/tokenizer_*.yaml)")
    add_config_flags(p, TokenizerConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt")
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenizer)

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
        "sweep",
        help="run pre-training runs and their evaluations from a YAML list, and tabulate them",
        description="Runs every run of SWEEP (pre-training, then knn / linprobe / finetune) in order into "
        "OUTPUT/<run>/, skipping finished parts and resuming an interrupted one, and writes sweep.md, "
        "sweep.csv, sweep.json and sweep.png. See maelab.sweep for the file format; sweeps/ ships examples.",
    )
    p.add_argument("sweep", metavar="SWEEP", help="sweep file (YAML), e.g. sweeps/methods.yaml")
    p.add_argument("--output", required=True, help="sweep directory (re-run the same command to continue)")
    p.add_argument("--scale", help="one of the sweep's scales (e.g. cpu, gpu): its budget and overrides")
    p.add_argument("--data", help="data.name of every run and evaluation (overrides the sweep's data)")
    p.add_argument("--only", type=lambda t: [x.strip() for x in t.split(",")], help="comma-separated run names to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

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
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="pre-training run directory (the --output of maelab pretrain), or a sweep directory (maelab sweep's "
        "--output: the comparison table, the sweep's figures and each run's last reconstruction)",
    )
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
    for key in ("device", "precision", "compile", "compile_mode", "fp8"):
        add_field_flag(p, PretrainConfig, key)
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
    p.add_argument("--gpu-resident", choices=SWITCHES, default="auto", help="GPU-resident data path for --data")
    p.add_argument("--decode", choices=DECODE_MODES, help="JPEG decoding for --data folders")
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
