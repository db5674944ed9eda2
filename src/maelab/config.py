"""Typed, validated configuration: one engine for every command.

Configs are frozen dataclasses. Each field has a doc string (the string literal under it, read by
:func:`field_docs` for the command line's ``--help``); each class checks its values in ``__post_init__`` and
raises :class:`~maelab.errors.ConfigError` naming the field, the value and what is allowed. A config is read
from YAML, changed with ``key=value`` overrides (dotted keys reach nested sections: ``data.num_workers=4``)
and written back (:func:`build_config`, :func:`save_yaml`).

Every protocol's config derives from :class:`RunConfig` (model, data, batch, device, precision, seed,
output); the training protocols (pre-training, fine-tuning, linear probing) from :class:`TrainConfig`, which
holds every field of the training loop. A subclass only re-declares a field's default.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import logging
import math
import os
import sys
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from maelab.engine.launch import job_env, task_cpus
from maelab.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ enumerations
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""``precision``: auto is bf16 on CUDA, fp32 elsewhere."""
SWITCHES = ("auto", "on", "off")
"""Values of the auto/on/off fields (``compile``, ``data.gpu_resident``)."""
DECODE_MODES = ("auto", "cpu", "gpu")
"""``data.decode``: where the JPEGs of an image folder are decoded."""
AUGMENTATIONS = ("none", "fixed_crop", "random_crop", "random_crop+color_jitter")
"""``data.augment``: the pre-training augmentations of the MAE paper's Table 1e (random_crop is its default)."""
POOLS = ("avg", "cls")
"""Feature pooling of the evaluations: mean of the patch tokens, or the class token."""
MASK_TYPES = ("random", "block", "grid")
ENCODERS = ("vit", "swin")
"""vit: timm ``VisionTransformer`` (every method); swin: timm ``SwinTransformer`` (SimMIM's hierarchical encoder)."""
TARGETS = ("pixels", "hog")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FP8_RECIPES = ("off", "tensorwise", "rowwise")
PROBE_OPTIMIZERS = ("lars", "sgd", "adamw")
MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("const", "rand", "pixel")
"""Random erasing's fill (timm ``RandomErasing(mode=...)``)."""
BUILTIN_DATASETS = ("synthetic", "cifar10", "cifar100", "stl10")
"""``data.name`` values that are not folders (each has one stored image size)."""

RENAMED_KEYS: dict[str, str] = {"crop_min_scale": "data.min_scale"}
"""Old dotted config key -> its new name. A recipe, a run's config.yaml, a checkpoint's config or a ``key=value``
with the old key still loads, with one warning (:func:`migrate_keys`)."""


def one_of(allowed: tuple[str, ...], default: str) -> Any:
    """A field whose value is one of ``allowed``: checked by :func:`check_choices`, listed by the CLI flag."""
    return field(default=default, metadata={"choices": allowed})


def listing(allowed: tuple[str, ...]) -> str:
    """``('auto', 'cpu', 'gpu')`` -> ``'auto, cpu or gpu'``."""
    return ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]


def on_off(value: Any) -> Any:
    """YAML reads a bare on / off as true / false: map bools back to 'on' / 'off' (other values unchanged)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def processes_on_node() -> int:
    """torchrun's LOCAL_WORLD_SIZE, or under ``srun`` alone SLURM's tasks on this node (e.g. SLURM_TASKS_PER_NODE
    ``8(x2)``), else 1: the training processes sharing this host."""
    try:
        return max(1, int(job_env().get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def processes_in_job() -> int:
    """torchrun's WORLD_SIZE, or under ``srun`` alone SLURM_NTASKS, else 1: the training processes of the job."""
    try:
        return max(1, int(job_env().get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def clamp_warmup(cfg: TrainConfig) -> None:
    """A ``warmup_epochs`` longer than the run (a recipe's warmup with a shorter ``--epochs``) becomes the run's
    length, with one warning (on rank 0); a negative one is an error. For every protocol's config."""
    _check(cfg.warmup_epochs >= 0, "warmup_epochs", cfg.warmup_epochs, "0 or more")
    if cfg.warmup_epochs > cfg.epochs:
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning(
                "warmup_epochs=%g is longer than the run (epochs=%d): warming up over all %d epochs instead",
                cfg.warmup_epochs,
                cfg.epochs,
                cfg.epochs,
            )
        object.__setattr__(cfg, "warmup_epochs", float(cfg.epochs))


def split_global_batch(global_batch: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """(per-process batch, accum_steps) for ``global_batch`` images per optimizer step over ``world_size``
    processes, with at most ``batch_size`` images per process and forward: the fewest accumulation steps that
    split this process's share into equal micro-batches. ConfigError when the processes cannot share it equally."""
    if global_batch % world_size:
        raise ConfigError(
            f"invalid global_batch={global_batch}: it does not divide among {world_size} processes "
            f"(WORLD_SIZE); use a multiple of {world_size} or another number of processes"
        )
    share = global_batch // world_size
    accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= batch_size)
    return share // accum, accum


def warn_poor_split(global_batch: int, cap: int, world: int, batch: int, accum: int) -> None:
    """One warning (rank 0) when :func:`split_global_batch` had to accumulate micro-batches of less than half the
    cap ``batch_size`` (a share with no divisor near the cap, e.g. 509 = 1 x 509 accum), with a global_batch
    that splits into full micro-batches and the next batch_size above the cap that divides the share."""
    if accum == 1 or batch >= cap // 2 or int(os.environ.get("RANK", "0")) != 0:
        return
    share = batch * accum
    better = max(1, round(share / cap)) * cap * world
    above = next(b for b in range(cap + 1, share + 1) if share % b == 0)
    log.warning(
        "global_batch=%d over %d processes is %d images per process, split as batch %d x %d accum_steps "
        "(batch_size=%d is the cap): a slow split; set e.g. global_batch=%d (batch %d x %d accum_steps), "
        "or batch_size=%d if that fits in memory",
        global_batch,
        world,
        share,
        batch,
        accum,
        cap,
        better,
        cap,
        better // (cap * world),
        above,
    )


def apply_global_batch(cfg: TrainConfig) -> None:
    """``global_batch`` set: derive ``batch_size`` (at most the given one) and ``accum_steps`` for this job's
    world size (:func:`split_global_batch`), so config.yaml records what each process runs."""
    if not cfg.global_batch:
        return
    _check(cfg.global_batch >= 1, "global_batch", cfg.global_batch, "a positive int, or 0 (unset)")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "a positive int")
    world = processes_in_job()
    batch, accum = split_global_batch(cfg.global_batch, cfg.batch_size, world)
    warn_poor_split(cfg.global_batch, cfg.batch_size, world, batch, accum)
    object.__setattr__(cfg, "accum_steps", accum)
    object.__setattr__(cfg, "batch_size", batch)


def batch_summary(batch_size: int, accum_steps: int | None, world_size: int, lr: float | None = None) -> str:
    """``batch 64 x 8 accum x 8 procs = 4096, peak lr 0.0024``: the start line's part on batch and lr.
    ``accum_steps`` None (a command that does not train: kNN, embed): ``batch 64 x 8 procs = 512``."""
    accum = "" if accum_steps is None else f" x {accum_steps} accum"
    text = f"batch {batch_size}{accum} x {world_size} procs = {batch_size * (accum_steps or 1) * world_size}"
    return text if lr is None else f"{text}, peak lr {lr:.3g}"


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name}={value!r}: {allowed}")


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Check every :func:`one_of` field of ``cfg``; a YAML bool becomes 'on' / 'off' where those are allowed."""
    for f in fields(cfg):
        allowed = f.metadata.get("choices")
        if allowed is None:
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, bool) and on_off(value) in allowed:
            value = on_off(value)
            object.__setattr__(cfg, f.name, value)
        _check(value in allowed, prefix + f.name, value, listing(allowed))


def check_betas(betas: tuple[float, float]) -> None:
    _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas", betas, "two numbers in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a masked autoencoder (encoder + decoder) and its masking/loss."""

    img_size: int | tuple[int, int] = 224
    """Input size in pixels; an int or (height, width). Must be divisible by patch_size."""
    patch_size: int = 16
    """Side of a square patch in pixels."""
    in_chans: int = 3
    """Input image channels."""
    embed_dim: int = 768
    """Encoder width."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width / embedding width, encoder and decoder."""
    decoder_embed_dim: int = 512
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder blocks (0: a linear prediction head on the encoder's tokens)."""
    decoder_num_heads: int = 16
    """Decoder attention heads."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder, in [0, 1)."""
    mask_type: str = one_of(MASK_TYPES, "random")
    """random (paper), block (BEiT-style) or grid (keep one patch of every 2x2)."""
    norm_pix_loss: bool = False
    """Regress per-patch normalized pixels (paper's better-representation setting)."""
    target: str = one_of(TARGETS, "pixels")
    """What the decoder predicts: pixels (MAE; see norm_pix_loss) or hog (MaskFeat's HOG features)."""
    mask_token_in_encoder: bool = False
    """Paper ablation (Table 1c, SimMIM-style): the encoder sees all patches, masked ones replaced by a
    learned token; the decoder then gets no extra mask tokens. Off (the paper's MAE) by default."""
    timm_name: str = "vit_base_patch16_224"
    """timm model name the encoder is created from (weights load into it with these kwargs)."""
    encoder: str = one_of(ENCODERS, "vit")
    """Encoder family: vit (a timm VisionTransformer of ``depth`` blocks) or swin (a timm SwinTransformer of
    ``depths`` stages; SimMIM only). For Swin, ``patch_size`` is the patch embedding's, ``embed_dim`` and
    ``num_heads`` are the first stage's (both double at each later stage)."""
    depths: tuple[int, ...] = (2, 2, 6, 2)
    """Swin: blocks per stage (each later stage halves the grid and doubles the width). Unused by the ViT."""
    window_size: int = 7
    """Swin: side of the attention windows in patches (a stage smaller than it attends globally)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them (less memory, more time)."""

    def __post_init__(self) -> None:
        size = self.img_size
        if isinstance(size, list):
            object.__setattr__(self, "img_size", tuple(size))
            size = self.img_size
        sizes = size if isinstance(size, tuple) else (size, size)
        _check(
            len(sizes) == 2 and all(isinstance(s, int) and s > 0 for s in sizes),
            "model_args.img_size",
            size,
            "a positive int or [height, width]",
        )
        _check(self.patch_size > 0, "model_args.patch_size", self.patch_size, "a positive int")
        for s in sizes:
            _check(
                s % self.patch_size == 0,
                "model_args.img_size",
                size,
                f"must be divisible by patch_size={self.patch_size}",
            )
        _check(self.in_chans > 0, "model_args.in_chans", self.in_chans, "a positive int")
        for prefix in ("", "decoder_"):
            dim, heads = getattr(self, f"{prefix}embed_dim"), getattr(self, f"{prefix}num_heads")
            name = f"model_args.{prefix}embed_dim"
            _check(dim % heads == 0, name, dim, f"must be divisible by {prefix}num_heads={heads}")
            if prefix or self.encoder == "vit":  # a Swin has no absolute position embedding
                _check(dim % 4 == 0, name, dim, "must be divisible by 4 (2-D sin-cos position embedding)")
        _check(self.depth >= 1, "model_args.depth", self.depth, "at least 1")
        _check(self.decoder_depth >= 0, "model_args.decoder_depth", self.decoder_depth, "0 or more")
        _check(0.0 <= self.mask_ratio < 1.0, "model_args.mask_ratio", self.mask_ratio, "a number in [0, 1)")
        check_choices(self, "model_args.")
        family = "swin" if self.timm_name.startswith("swin") else "vit"
        _check(
            family == self.encoder,
            "model_args.encoder",
            self.encoder,
            f"timm_name={self.timm_name!r} is a {family}: pick a preset of the family (maelab models lists swin_* and "
            "mae_vit_* ones) rather than switching model_args.encoder",
        )
        if self.encoder == "swin":
            self._check_swin(sizes)
        if self.target == "hog":
            cell = min(8, self.patch_size)
            _check(
                self.patch_size % cell == 0,
                "model_args.patch_size",
                self.patch_size,
                "the hog target needs a patch size that is a multiple of 8 (or at most 8)",
            )
        if self.mask_type == "grid":
            _check(
                self.mask_ratio == 0.75,
                "model_args.mask_ratio",
                self.mask_ratio,
                "grid masking keeps one patch of every 2x2, so it needs mask_ratio=0.75",
            )
            _check(
                all((s // self.patch_size) % 2 == 0 for s in sizes),
                "model_args.img_size",
                size,
                "grid masking needs an even number of patches per side",
            )

    def _check_swin(self, sizes: tuple[int, int]) -> None:
        """The Swin fields: stage depths, window, and an image that every patch merging halves evenly."""
        depths = self.depths
        _check(
            len(depths) >= 1 and all(isinstance(d, int) and d >= 1 for d in depths),
            "model_args.depths",
            depths,
            "one or more positive block counts, one per Swin stage",
        )
        _check(self.window_size >= 1, "model_args.window_size", self.window_size, "a positive int")
        stride = self.encoder_stride
        for s in sizes:
            _check(
                s % stride == 0,
                "model_args.img_size",
                self.img_size,
                f"must be divisible by the Swin encoder's stride {stride} (patch_size={self.patch_size} x 2 per "
                f"patch merging, {len(depths) - 1} of them)",
            )

    @property
    def encoder_stride(self) -> int:
        """Pixels per token of the encoder's last stage: ``patch_size`` for the ViT, ``patch_size * 2 ** (stages
        - 1)`` for Swin (SimMIM's ``encoder_stride``)."""
        if self.encoder == "swin":
            return self.patch_size * 2 ** (len(self.depths) - 1)
        return self.patch_size

    @property
    def has_class_token(self) -> bool:
        """Whether the encoder's output starts with a class token (a ViT's does; a Swin's map has none)."""
        return self.encoder == "vit"

    @property
    def num_features(self) -> int:
        """Width of the encoder's output tokens: ``embed_dim`` (ViT) or the last Swin stage's."""
        if self.encoder == "swin":
            return self.embed_dim * 2 ** (len(self.depths) - 1)
        return self.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        h, w = self.img_size if isinstance(self.img_size, tuple) else (self.img_size, self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.timm_name, **kwargs)`` (no head)."""
        if self.encoder == "swin":
            return dict(
                img_size=self.img_size,
                patch_size=self.patch_size,
                in_chans=self.in_chans,
                embed_dim=self.embed_dim,
                depths=tuple(self.depths),
                num_heads=tuple(self.num_heads * 2**i for i in range(len(self.depths))),
                window_size=self.window_size,
                mlp_ratio=self.mlp_ratio,
                qkv_bias=True,
                num_classes=0,
                global_pool="avg",
                drop_path_rate=0.0,
            )
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are loaded."""

    name: str = "synthetic"
    """synthetic, cifar10, cifar100, stl10, a folder (ImageFolder or a plain tree of images), WebDataset shards
    ('shards/train-{000000..000127}.tar' or a directory written by maelab shard; pre-training only), or a Hugging
    Face dataset on disk (a save_to_disk directory or a directory of parquet files)."""
    root: str | None = None
    """Local root for torchvision datasets (default ~/.cache/maelab/data)."""
    download: bool = False
    """Allow torchvision datasets to download (never needed for synthetic or folders)."""
    split: str = "train"
    """Training split: the subfolder of a folder laid out as train/ + test/ (default train); for stl10 one of
    train, unlabeled, train+unlabeled. Evaluation uses test/ (else val/) or the dataset's test split."""
    crop_pct: float | str = "auto"
    """Evaluation transform: resize the short side to img_size / crop_pct, then center-crop. auto: the official
    rule, 224/256 up to 224 px and 1.0 above (maelab.data.transforms.resolve_crop_pct); 1.0 suits 32 px data."""
    num_samples: int = 2048
    """Synthetic dataset size (ignored for other datasets)."""
    num_classes: int = 10
    """Synthetic dataset class count (ignored for other datasets)."""
    max_samples: int = 0
    """Use at most this many images of each split, evenly spaced over it (class-balanced for class folders and
    torchvision sets, whose images are grouped or shuffled by class); 0: all. For quick runs on a subset."""
    num_workers: int | str = "auto"
    """DataLoader worker processes per training process, or auto: the CPUs this process may use
    (os.sched_getaffinity) divided by the processes on this node (torchrun's LOCAL_WORLD_SIZE; under srun alone
    SLURM_CPUS_PER_TASK, at most those CPUs), at least 1
    and at most 16. auto is resolved when the config is built, so config.yaml records the number used."""
    mean: tuple[float, ...] | None = None
    """Per-channel normalization mean (default: ImageNet for 3 channels, 0.5 otherwise)."""
    std: tuple[float, ...] | None = None
    """Per-channel normalization standard deviation (default: ImageNet for 3 channels, 0.5 otherwise)."""
    min_scale: float = 0.2
    """RandomResizedCrop lower scale bound of the training images (pre-training paper: 0.2; fine-tuning and linear
    probing default to 0.08)."""
    hflip: bool = True
    """Random horizontal flip of the training images."""
    augment: str = one_of(AUGMENTATIONS, "random_crop")
    """Pre-training augmentation, the MAE paper's Table 1e (maelab.data.transforms.pretrain_transform). random_crop:
    RandomResizedCrop(min_scale to 1) + flip, the paper's default; random_crop+color_jitter: the same, then
    ColorJitter(0.4, 0.4, 0.4, 0.1) on 80% of the images (MoCo v2's; 1 or 3 channels); fixed_crop: a random crop
    at one scale + flip (an image of the input size padded 4 px by reflection, as for CIFAR; any other resized to
    cover img_size / 0.875, as for ImageNet); none: the evaluation transform (resize to img_size / crop_pct, center
    crop), no flip. The GPU-resident and decode=gpu paths do random_crop only (gpu_resident=auto is then off).
    Fine-tuning, linear probing and kNN do not use it: they have their own transforms."""
    strict: bool = False
    """Fail on the first unreadable image instead of skipping it."""
    image_column: str | None = None
    """Hugging Face datasets on disk: the column holding the images (default: the first Image feature)."""
    gpu_resident: str | bool = one_of(SWITCHES, "auto")
    """Pre-training: keep the decoded training set on the device as uint8 and crop/flip/normalize whole batches
    there (maelab.data.resident, maelab.data.loaders). auto: on for CUDA when the images have at most 64 px on
    their longer side
    (synthetic/cifar10/cifar100/stl10 by their known size; folders by the headers of 32 evenly spaced files, read
    before anything is decoded), the set fits in a quarter of the free GPU memory and the node's ranks' decoded
    copies in half of the available host memory; on: always; off: the per-sample CPU DataLoader. Images are
    stored at their common size, or at the model's input size when the sizes differ (or the common size is above
    64 px). Off with decode=gpu unless set to on."""
    decode: str = one_of(DECODE_MODES, "auto")
    """Pre-training on an image folder: where JPEGs are decoded. cpu: Pillow in the DataLoader workers, one
    sample at a time; gpu: the workers only read the files, the training device decodes each batch (TorchCodec's
    decode_jpeg if installed, else torchvision's; nvJPEG on CUDA) and crops/flips/normalizes it
    (maelab.data.jpeg_gpu; the same crops and flips as cpu, and on CPU the same pixels); auto: cpu for now (gpu is
    the option to measure on a GPU before it becomes a default)."""
    MAX_AUTO_WORKERS = 16

    @classmethod
    def auto_num_workers(cls) -> int:
        """``num_workers=auto``: this process's CPUs / processes on the node (under ``srun`` alone: its
        SLURM_CPUS_PER_TASK, at most its CPUs), clamped to [1, MAX_AUTO_WORKERS]."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            cpus = os.cpu_count() or 1
        per_task = task_cpus()  # srun alone: the task's share of the node, whether srun bound it to them or not
        share = min(cpus, per_task) if per_task else cpus // processes_on_node()
        return max(1, min(cls.MAX_AUTO_WORKERS, share))

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        _check(bool(self.name), "data.name", self.name, "a dataset name or a folder path")
        _check(self.num_samples > 0, "data.num_samples", self.num_samples, "a positive int")
        _check(self.num_classes >= 2, "data.num_classes", self.num_classes, "at least 2")
        _check(self.max_samples >= 0, "data.max_samples", self.max_samples, "0 (all) or a positive int")
        if self.num_workers == "auto":
            object.__setattr__(self, "num_workers", self.auto_num_workers())
        workers = self.num_workers
        workers_ok = isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0
        _check(workers_ok, "data.num_workers", workers, "0 or more, or auto")
        _check(0.0 < self.min_scale <= 1.0, "data.min_scale", self.min_scale, "a number in (0, 1]")
        _check(
            self.crop_pct == "auto" or (not isinstance(self.crop_pct, str) and 0.0 < self.crop_pct <= 1.0),
            "data.crop_pct",
            self.crop_pct,
            "a number in (0, 1], or auto",
        )
        _check(bool(self.split), "data.split", self.split, "a split name such as train")
        check_choices(self, "data.")
        _check(
            self.decode != "gpu" or self.name.lower() not in BUILTIN_DATASETS,
            "data.decode",
            self.decode,
            f"decoding on the device needs an image folder as data.name, not {self.name!r}; use decode=cpu",
        )
        _check(
            self.decode != "gpu" or self.gpu_resident != "on",
            "data.decode",
            self.decode,
            "gpu_resident=on decodes the set once; use decode=cpu with it, or gpu_resident=auto/off",
        )
        if self.std is not None:
            _check(all(s > 0 for s in self.std), "data.std", self.std, "positive numbers")


def data_defaults(**defaults: Any) -> Any:
    """The ``data`` field of a protocol whose DataConfig defaults differ (e.g. ``min_scale=0.08``): they hold for
    ``DataConfig()`` and for every partial ``data:`` mapping of a recipe or override."""
    return field(default_factory=functools.partial(DataConfig, **defaults))


def _section(owner: type, name: str, value: Any, prefix: str) -> Any:
    """A nested config section (``data``) from a mapping, over the owner's defaults of that section."""
    if not isinstance(value, dict):
        return value
    factory = next(f.default_factory for f in fields(owner) if f.name == name)
    defaults = factory.keywords if isinstance(factory, functools.partial) else {}
    return from_dict(field_types(owner)[name], {**defaults, **value}, prefix=f"{prefix}{name}.")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every command's config has: the model, the data, the batch, where it runs and where results go."""

    model: str | None = None
    """Preset name (maelab models lists them); evaluation: checked against the checkpoint's architecture, or the
    architecture of a from_scratch run."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's ModelConfig fields, e.g. {norm_pix_loss: true}."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where images come from and how they are loaded: data.name, data.num_workers, data.min_scale, ..."""
    batch_size: int = 64
    """Images per batch in each process; training: per forward, and with global_batch the most a process takes
    per forward."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    precision: str = one_of(PRECISIONS, "auto")
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32."""
    seed: int = 0
    """Seed of python's, numpy's and torch's random number generators."""
    output: str | None = None
    """Run directory: config.yaml, metrics.jsonl and checkpoints/ of a training run, eval.json of an evaluation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _section(type(self), "data", self.data, ""))
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "a positive int")
        check_choices(self)
        _check(
            self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda"),
            "device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        if not isinstance(self.model_args, dict):
            raise ConfigError(f"invalid model_args={self.model_args!r}: a mapping of ModelConfig fields")
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(self.model_args) - known, key=str)
        _check(not unknown, "model_args", unknown, f"unknown field(s); allowed: {sorted(known)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    """Every field of the training loop (pre-training, fine-tuning, linear probing), declared once."""

    epochs: int = 10
    """Passes over the training set."""
    accum_steps: int = 1
    """Gradient accumulation: optimizer steps every accum_steps batches (derived when global_batch is set: then
    accum_steps on the command line is an error)."""
    global_batch: int = 0
    """Images per optimizer step over all processes, as papers state it (0: unset, batch_size x accum_steps x
    processes). When set, batch_size is the memory cap: each process takes global_batch / WORLD_SIZE images per
    step in the fewest equal micro-batches of at most batch_size (accum_steps); batch_size and accum_steps are
    rewritten to those values (config.yaml records them). Error when WORLD_SIZE does not divide it."""
    base_lr: float = 1.5e-4
    """lr = base_lr * effective_batch / 256 (paper), effective_batch = batch_size x accum_steps x processes."""
    lr: float | None = None
    """Absolute peak lr; overrides base_lr when set."""
    min_lr: float = 0.0
    """Floor of the cosine lr schedule."""
    weight_decay: float = 0.05
    """Decoupled weight decay (AdamW; LARS / SGD of the linear probe)."""
    warmup_epochs: float = 1.0
    """Linear lr warmup from 0, in epochs (may be fractional); a longer one than the run becomes the run."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value; null: no clipping."""
    max_bad_steps: int = 0
    """Skip up to this many steps with a non-finite loss (checked every step) before stopping.
    0: stop at the first one (checked at each log interval on CUDA, every step on CPU)."""
    log_every: int = 10
    """Optimizer steps between progress/loss updates (and non-finite checks on CUDA)."""
    save_every: int = 1
    """Epochs between periodic checkpoints."""
    save_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0 = off)."""
    keep_last: int = 3
    """Periodic checkpoints kept besides last.pt."""
    tensorboard: bool = False
    """Also write the logged metrics as TensorBoard events into the run directory."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.epochs >= 1, "epochs", self.epochs, "a positive int")
        _check(self.accum_steps >= 1, "accum_steps", self.accum_steps, "a positive int")
        apply_global_batch(self)
        _check(self.base_lr > 0, "base_lr", self.base_lr, "a positive number")
        _check(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number or null")
        _check(self.min_lr >= 0, "min_lr", self.min_lr, "0 or more")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or more")
        clamp_warmup(self)
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "a positive number or null")
        _check(self.max_bad_steps >= 0, "max_bad_steps", self.max_bad_steps, "0 or more")
        for name in ("log_every", "save_every"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "a positive int")
        _check(self.save_every_steps >= 0, "save_every_steps", self.save_every_steps, "0 or more")
        _check(self.keep_last >= 0, "keep_last", self.keep_last, "0 or more")

    def effective_batch(self, world_size: int = 1) -> int:
        """Images per optimizer step over ``world_size`` processes."""
        return self.batch_size * self.accum_steps * world_size

    def resolved_lr(self, world_size: int = 1) -> float:
        """Peak lr: ``lr`` if set, else ``base_lr * effective_batch / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.effective_batch(world_size) / 256


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(TrainConfig):
    """Everything a pre-training run needs. Written to ``config.yaml`` in the run directory."""

    model: str = "mae_vit_tiny_patch4_32"
    """Preset name (maelab models lists them)."""
    method: str = "mae"
    """Pre-training method (maelab.methods.METHODS): mae, simmim, maskfeat, beit, ae or vae. Each sets its own
    model_args defaults (e.g. simmim: mask_ratio 0.6) unless model_args sets them."""
    method_args: dict[str, Any] = field(default_factory=dict)
    """The method's own options, e.g. {loss: l1, mask_unit: 32} for simmim, {beta: 0.1} for vae."""
    output: str = "runs/pretrain"
    init: str | None = None
    """Start from these MAE weights, decoder included (a Hugging Face ViTMAE directory, an official full .pth,
    a maelab .pt or run directory): a new run with a fresh optimizer and schedule, not a resume."""
    init_encoder: str | None = None
    """Start the encoder from a timm ViT state dict (.safetensors or .pth) of the same architecture (head ignored);
    the decoder starts fresh. For continued pre-training on your own domain."""
    weight_decay_tokens: bool = True
    """Weight decay on cls_token / mask_token, as the official pre-training (timm 0.3.2's add_weight_decay exempts
    only 1-D params and biases); false exempts them too (the position embeddings are fixed either way)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper: 0.9, 0.95)."""
    compile: str | bool = one_of(SWITCHES, "auto")
    """torch.compile the model: auto (on for CUDA, off elsewhere), on, off. Same math, fused kernels."""
    compile_mode: str = one_of(COMPILE_MODES, "default")
    """torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs."""
    fp8: str | bool = one_of(FP8_RECIPES, "off")
    """Opt-in float8 training of the transformer blocks' Linear layers (torchao; Ada/Hopper GPUs):
    off, tensorwise or rowwise. Changes the arithmetic: see BENCHMARKS.md for the evidence."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over ranks (torch fully_shard) instead of DDP:
    for ViT-L/H and larger under torchrun. Checkpoints are saved unsharded, so they reload at any world size."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bit-identical reruns (slower on GPU)."""
    vis_every: int = 5
    """Epochs between reconstruction figures (one is always written at the end)."""
    knn_every: int = 0
    """Epochs between kNN accuracy checks of the encoder (0 = off), logged as knn_top1 in metrics.jsonl (class-token
    features; a Swin's averaged tokens)."""
    knn_data: str | None = None
    """Labeled validation set for the kNN check (name or folder); default: the test split of ``data``."""
    knn_max_train: int = 10000
    """At most this many training images form the kNN memory bank (an evenly spaced subset)."""
    knn_k: int = 20
    """Neighbours voting in the kNN check."""
    knn_temperature: float = 0.07
    """Vote weight exp(similarity / T) of the kNN check."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        super().__post_init__()
        check_betas(self.betas)
        _check(
            self.accum_steps == 1 or self.compile_mode not in ("reduce-overhead", "max-autotune"),
            "compile_mode",
            self.compile_mode,
            "default or max-autotune-no-cudagraphs with accum_steps > 1: CUDA graphs give wrong "
            "gradients under gradient accumulation in torch (pytorch/pytorch#96693, #169545)",
        )
        _check(
            self.fp8 == "off" or self.precision in ("auto", "bf16", "fp32"),
            "fp8",
            self.fp8,
            "off with precision=fp16 (float8 training runs under bf16 autocast)",
        )
        _check(self.vis_every >= 1, "vis_every", self.vis_every, "a positive int")
        _check(self.knn_every >= 0, "knn_every", self.knn_every, "0 (off) or a positive number of epochs")
        _check(self.knn_max_train >= 1, "knn_max_train", self.knn_max_train, "a positive int")
        _check(self.knn_k >= 1, "knn_k", self.knn_k, "a positive int")
        _check(self.knn_temperature > 0, "knn_temperature", self.knn_temperature, "a positive number")
        _check(
            not (self.init and self.init_encoder),
            "init_encoder",
            self.init_encoder,
            f"null when init is set (init={self.init!r} already holds the encoder)",
        )
        from maelab.methods import get_method, method_options  # the registry imports this module

        method = get_method(self.method)
        method_options(method, self.method_args)
        _check(
            not self.init or self.method == "mae",
            "init",
            self.init,
            f"null for method={self.method} (init loads a whole MAE); use init_encoder for the encoder",
        )


# ----------------------------------------------------------------------------------------
# dict / YAML conversion


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotations of config class ``cls`` (``typing.get_type_hints``, cached)."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = get_type_hints(cls)
    return _FIELD_TYPES[cls]


@functools.cache
def _class_docs(module: str) -> dict[str, dict[str, str]]:
    """{class: {field: doc string, on one line}} of the top-level classes of ``module``, from its source."""
    out: dict[str, dict[str, str]] = {}
    for cls in ast.parse(inspect.getsource(sys.modules[module])).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        docs = out[cls.name] = {}
        for node, after in zip(cls.body, cls.body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return out


@functools.cache
def field_docs(cls: Any) -> dict[str, str]:
    """Each field's doc string: the string literal under it in the class body (a subclass's wins), on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if hasattr(klass, "__dataclass_fields__"):
            docs.update(_class_docs(klass.__module__).get(klass.__qualname__, {}))
    return docs


_SCALARS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _describe(annotation: Any) -> str:
    """What a value of ``annotation`` must be, in words: ``a finite number or null``."""
    if get_origin(annotation) in (Union, types.UnionType):
        return listing(tuple(_describe(a) for a in get_args(annotation)))
    if annotation is type(None):
        return "null"
    if dataclasses.is_dataclass(annotation) or dict in (annotation, get_origin(annotation)):
        return "a mapping"
    if tuple in (annotation, get_origin(annotation)) or list in (annotation, get_origin(annotation)):
        return "a list"
    return _SCALARS.get(annotation, str(annotation))


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """A YAML / command-line ``value`` as ``annotation``; ConfigError naming ``name`` and what is allowed."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, name)
            except ConfigError:
                pass
    elif annotation is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):  # type: ignore[arg-type]
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value, prefix=f"{name}.")  # type: ignore[arg-type]
    elif tuple in (annotation, origin) or list in (annotation, origin):
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0] if args else Any, name) for v in value)
    elif dict in (annotation, origin):
        if isinstance(value, dict):
            return dict(value)
    elif annotation is Any:
        return value
    elif isinstance(value, bool):
        if annotation is bool:
            return value
    elif annotation is int:
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    elif annotation is str:
        if isinstance(value, (str, int, float)):
            return str(value)
    raise ConfigError(f"invalid {name}={value!r}: {_describe(annotation)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Config ``cls`` from a mapping: renamed keys moved (:data:`RENAMED_KEYS`, at the top level), unknown keys
    refused, values coerced to the fields' types, nested sections over the class's defaults of them."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {prefix.rstrip('.') or cls.__name__}: a mapping is required")
    if not prefix and issubclass(cls, RunConfig):
        data = migrate_keys(data)
    hints = field_types(cls)
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}: allowed keys are {sorted(known)}")
    kwargs = {
        k: _coerce(_section(cls, k, v, prefix) if k == "data" else v, hints[k], prefix + k) for k, v in data.items()
    }
    return cls(**kwargs)


_MISSING = object()


def _take(data: dict[str, Any], key: str) -> tuple[dict[str, Any], Any]:
    """(``data`` without the dotted ``key``, its value or _MISSING); ``data`` itself is not changed."""
    head, _, rest = key.partition(".")
    if not rest:
        if head not in data:
            return data, _MISSING
        out = dict(data)
        return out, out.pop(head)
    child = data.get(head)
    if not isinstance(child, dict):
        return data, _MISSING
    child, value = _take(child, rest)
    return {**data, head: child}, value


def migrate_keys(data: dict[str, Any], dotted: bool = False) -> dict[str, Any]:
    """``data`` with each old key of :data:`RENAMED_KEYS` under its new name, one warning (rank 0) per key moved.
    ``data``: a nested mapping (recipe, config.yaml, a checkpoint's config) or, with ``dotted``, flat ``key=value``
    overrides. The old key wins over the new one in the same mapping: a config saved before the rename holds both,
    and its old key is the setting that was used (evaluation ignored data.min_scale)."""
    for old, new in RENAMED_KEYS.items():
        if dotted:
            value = data.get(old, _MISSING)
            rest = {k: v for k, v in data.items() if k != old}
        else:
            rest, value = _take(data, old)
        if value is _MISSING:
            continue
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("config key %s is now %s: read %s=%r as %s; rename it", old, new, old, value, new)
        data = {**rest, new: value} if dotted else apply_overrides(rest, {new: value})
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-safe dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """``'data.num_workers=4'`` -> ``('data.num_workers', 4)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"invalid override {text!r}: use key=value, e.g. epochs=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"invalid override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy). ``model_args.x`` and ``data.y`` nest."""
    out = dict(data)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            child = node.get(p)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(f"invalid override {key}: {p} is not a section")
            node[p] = dict(child or {})
            node = node[p]
        node[leaf] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # str(e) quotes the line: several lines
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys")
    return data


def save_yaml(cfg: Any, path: str | Path) -> None:
    """``cfg`` as YAML at ``path``, atomically (:func:`maelab.io.atomic_write`)."""
    from maelab.io import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def refuse_accum_with_global_batch(
    cls: type, data: dict[str, Any], overrides: dict[str, Any], file: str | Path | None = None
) -> None:
    """ConfigError when ``accum_steps`` is given on the command line (flag or key=value) while ``data`` (file +
    overrides) sets a ``global_batch``, which derives accum_steps. Only the overrides count: a run's own
    config.yaml records both (the derived accum_steps) and must reload at any world size."""
    if issubclass(cls, TrainConfig) and "accum_steps" in overrides and data.get("global_batch"):
        source = "" if "global_batch" in overrides or not file else f" (in {file})"
        raise ConfigError(
            f"accum_steps={overrides['accum_steps']!r} and global_batch={data['global_batch']!r}{source} "
            "both given: global_batch derives accum_steps for the number of processes, with "
            "batch_size as the most images per forward; drop accum_steps, or set global_batch=0 "
            "to train with batch_size x accum_steps x processes"
        )


def build_config(cls: type[T], file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Config from an optional YAML file, then dotted overrides (old key names moved to their new ones, see
    :data:`RENAMED_KEYS`); errors name file and key."""
    flags = migrate_keys(overrides or {}, dotted=True)
    data = apply_overrides(migrate_keys(load_yaml(file)) if file else {}, flags)
    refuse_accum_with_global_batch(cls, data, flags, file)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if file:
            raise ConfigError(f"{file}: {e}") from e
        raise
