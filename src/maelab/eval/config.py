"""Typed, validated configs of the evaluation protocols (same style as :mod:`maelab.config`).

- :class:`FinetuneConfig`: end-to-end (or partial) fine-tuning; defaults are the paper's
  ViT-B recipe (He et al. 2022, Table 9).
- :class:`LinprobeConfig`: linear probing on frozen features (paper Table 10), or partial
  fine-tuning of the last ``train_blocks`` blocks with the probe's head.
- :class:`KnnConfig`: weighted k-nearest-neighbour classification of frozen features.
- :class:`EmbedConfig`: frozen features of every image of a folder, written to a file (``maelab embed``).

Read them with ``maelab.config.build_config(FinetuneConfig, file, overrides)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from maelab.config import DataConfig, ModelConfig, _check, apply_global_batch, clamp_warmup, from_dict
from maelab.data.transforms import RESIZED_CROPS
from maelab.errors import ConfigError

POOLS = ("avg", "cls")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PROBE_OPTIMIZERS = ("lars", "sgd", "adamw")
DEFAULT_SCRATCH_MODEL = "mae_vit_tiny_patch4_32"
"""Architecture of ``from_scratch`` runs when no ``model`` is given (pre-training's default)."""


def _check_common(cfg: Any) -> None:
    """Checks shared by the three protocols (source, data, device, precision, pooling)."""
    if isinstance(cfg.data, dict):
        object.__setattr__(cfg, "data", from_dict(DataConfig, cfg.data, prefix="data."))
    _check(cfg.pool in POOLS, "pool", cfg.pool, f"one of {POOLS} (avg: global average pooling, cls: class token)")
    _check(
        cfg.device == "auto" or cfg.device in ("cpu", "mps") or cfg.device.startswith("cuda"),
        "device",
        cfg.device,
        "auto, cpu, cuda or cuda:N",
    )
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, f"one of {PRECISIONS}")
    if not isinstance(cfg.model_args, dict):
        raise ConfigError(f"invalid model_args={cfg.model_args!r}: a mapping of ModelConfig fields")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(cfg.model_args) - known)
    _check(not unknown, "model_args", unknown, f"unknown field(s); allowed: {sorted(known)}")


def _check_source(cfg: Any, scratch_allowed: bool) -> None:
    if scratch_allowed and cfg.from_scratch:
        return  # a checkpoint (e.g. from a recipe) is ignored
    hint = " (or from_scratch=true for the random-init baseline)" if scratch_allowed else ""
    _check(
        bool(cfg.checkpoint),
        "checkpoint",
        cfg.checkpoint,
        "required: a pre-training run directory, a maelab .pt, an official MAE .pth or an exported "
        f".safetensors{hint}; pass --checkpoint",
    )


def _check_training(cfg: Any) -> None:
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "a positive int")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "a positive int")
    _check(cfg.base_lr > 0, "base_lr", cfg.base_lr, "a positive number")
    _check(cfg.lr is None or cfg.lr > 0, "lr", cfg.lr, "a positive number or null")
    _check(cfg.min_lr >= 0, "min_lr", cfg.min_lr, "0 or more")
    _check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "0 or more")
    clamp_warmup(cfg)
    _check(0.0 < cfg.crop_min_scale <= 1.0, "crop_min_scale", cfg.crop_min_scale, "a number in (0, 1]")
    _check(
        cfg.train_blocks is None or cfg.train_blocks >= 0,
        "train_blocks",
        cfg.train_blocks,
        "0 or more (the number of last blocks to tune), or null for all",
    )
    _check(cfg.log_every >= 1, "log_every", cfg.log_every, "a positive int")
    _check(cfg.eval_every >= 1, "eval_every", cfg.eval_every, "a positive int")


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end fine-tuning of a pre-trained encoder as a timm ViT classifier.

    Defaults follow the paper's ViT-B recipe (Table 9): AdamW(0.9, 0.999), base lr 1e-3
    at batch 1024, weight decay 0.05, layer decay 0.75, 100 epochs with 5 warmup, drop
    path 0.1, RandAugment(9, 0.5), label smoothing 0.1, mixup 0.8, cutmix 1.0, random
    erasing 0.25, global average pooling. (The official repository later used base lr
    5e-4 and layer decay 0.65 for ViT-B; see recipes/finetune_imagenet_vit_base_paper.yaml.)
    """

    checkpoint: str | None = None
    """Pre-trained weights: run directory, maelab .pt, official MAE .pth or exported .safetensors."""
    from_scratch: bool = False
    """Random (timm) initialization, ignoring any checkpoint: the paper's supervised baseline."""
    model: str | None = None
    """Preset for from_scratch runs; with a checkpoint it is only checked against the checkpoint."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's ModelConfig fields (from_scratch or the check against a checkpoint)."""
    data: DataConfig = field(default_factory=DataConfig)
    img_size: int | tuple[int, int] | None = None
    """Fine-tuning resolution; null: the encoder's. Position embeddings are resampled if it differs."""
    pool: str = "avg"
    """avg: global average pooling + fc_norm (paper); cls: the class token after the final norm."""
    epochs: int = 100
    batch_size: int = 64
    """Per-device batch size (with global_batch: the most images a process takes per forward)."""
    accum_steps: int = 1
    """Gradient accumulation: optimizer steps every accum_steps batches (derived when global_batch is set: then
    accum_steps on the command line is an error)."""
    global_batch: int = 0
    """Images per optimizer step over all processes, as papers state it (paper: 1024; 0: unset). When set,
    batch_size is the memory cap and batch_size / accum_steps are derived for WORLD_SIZE processes as in
    pre-training (maelab.config.split_global_batch); error when WORLD_SIZE does not divide it."""
    base_lr: float = 1e-3
    """lr = base_lr * effective_batch / 256 (paper)."""
    lr: float | None = None
    """Absolute peak lr; overrides base_lr when set."""
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i of L gets lr * layer_decay ** (L - i); 1.0 turns it off."""
    warmup_epochs: float = 5.0
    drop_path: float = 0.1
    """Stochastic depth rate of the classifier."""
    mixup: float = 0.8
    """Mixup alpha (0 disables)."""
    cutmix: float = 1.0
    """CutMix alpha (0 disables)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are enabled."""
    mixup_mode: str = "batch"
    """batch, pair or elem (timm Mixup)."""
    smoothing: float = 0.1
    """Label smoothing (folded into the soft targets when mixup/cutmix is on)."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy (RandAugment m9, mstd 0.5); null disables."""
    color_jitter: float | None = None
    """Color jitter strength (only used when auto_augment is null)."""
    reprob: float = 0.25
    """Random erasing probability."""
    remode: str = "pixel"
    recount: int = 1
    crop_min_scale: float = 0.08
    """RandomResizedCrop lower scale bound of the training transform."""
    grad_clip: float | None = None
    ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too."""
    ema_decay: float = 0.9999
    train_blocks: int | None = None
    """Partial fine-tuning (paper Fig. 9): tune only the last K blocks (+ final norm and head); null: all."""
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32."""
    seed: int = 0
    output: str = "runs/finetune"
    log_every: int = 10
    eval_every: int = 1
    """Epochs between evaluations (the last epoch is always evaluated)."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.img_size, list):
            object.__setattr__(self, "img_size", tuple(self.img_size))
        if isinstance(self.auto_augment, str) and self.auto_augment.strip().lower() in ("", "none", "off"):
            object.__setattr__(self, "auto_augment", None)
        _check_common(self)
        _check_source(self, scratch_allowed=True)
        _check(self.accum_steps >= 1, "accum_steps", self.accum_steps, "a positive int")
        apply_global_batch(self)
        _check_training(self)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)"
        )
        _check(0.0 < self.layer_decay <= 1.0, "layer_decay", self.layer_decay, "a number in (0, 1]")
        _check(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "a number in [0, 1)")
        _check(self.mixup >= 0, "mixup", self.mixup, "0 (off) or a positive alpha")
        _check(self.cutmix >= 0, "cutmix", self.cutmix, "0 (off) or a positive alpha")
        _check(0.0 <= self.mixup_prob <= 1.0, "mixup_prob", self.mixup_prob, "a number in [0, 1]")
        _check(0.0 <= self.mixup_switch_prob <= 1.0, "mixup_switch_prob", self.mixup_switch_prob, "a number in [0, 1]")
        _check(self.mixup_mode in ("batch", "pair", "elem"), "mixup_mode", self.mixup_mode, "one of batch, pair, elem")
        if self.uses_mixup:
            _check(
                self.batch_size % 2 == 0,
                "batch_size",
                self.batch_size,
                "must be even when mixup/cutmix is on (timm Mixup pairs samples)",
            )
        _check(0.0 <= self.smoothing < 1.0, "smoothing", self.smoothing, "a number in [0, 1)")
        _check(0.0 <= self.reprob <= 1.0, "reprob", self.reprob, "a number in [0, 1]")
        _check(self.remode in ("const", "rand", "pixel"), "remode", self.remode, "one of const, rand, pixel")
        _check(self.recount >= 1, "recount", self.recount, "a positive int")
        _check(
            self.auto_augment is None
            or self.auto_augment.startswith(("rand", "augmix", "original", "v0", "3a", "trivial")),
            "auto_augment",
            self.auto_augment,
            "a timm policy such as rand-m9-mstd0.5-inc1, or null",
        )
        _check(
            self.color_jitter is None or self.color_jitter >= 0, "color_jitter", self.color_jitter, "0 or more, or null"
        )
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "a positive number or null")
        _check(0.0 < self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a number in (0, 1)")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def effective_batch(self, world_size: int = 1) -> int:
        return self.batch_size * self.accum_steps * world_size

    def resolved_lr(self, world_size: int = 1) -> float:
        """Peak lr: ``lr`` if set, else ``base_lr * effective_batch / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.effective_batch(world_size) / 256


@dataclass(frozen=True)
class LinprobeConfig:
    """Linear probing: frozen encoder, BatchNorm(affine=False) + Linear head.

    Defaults follow the paper (Table 10): class-token features, LARS with base lr 0.1
    (lr = 0.1 * batch / 256), no weight decay, 90 epochs with 10 warmup, RandomResizedCrop
    + flip. The paper's batch is 16384; the default here (256) fits any dataset. With
    ``augment: false`` and ``train_blocks: 0`` features are extracted once and the head is
    trained on the cache (same result as streaming, much faster).
    """

    checkpoint: str | None = None
    """Pre-trained weights: run directory, maelab .pt, official MAE .pth or exported .safetensors."""
    model: str | None = None
    """Optional preset checked against the checkpoint's architecture."""
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    pool: str = "cls"
    """cls: class token after the final norm (paper); avg: mean of the normed patch tokens."""
    epochs: int = 90
    batch_size: int = 256
    """Per-device batch size (with global_batch: the most images a process may take per step)."""
    global_batch: int = 0
    """Images per step over all processes, as the paper states it (16384; 0: unset). When set, batch_size
    becomes global_batch / WORLD_SIZE (recorded in config.yaml); error when WORLD_SIZE does not divide it or the
    share exceeds batch_size (no accumulation: the head's BatchNorm normalizes over the whole batch at once)."""
    optimizer: str = "lars"
    """lars (paper), sgd (momentum) or adamw."""
    base_lr: float = 0.1
    """lr = base_lr * batch_size / 256."""
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    """Momentum of LARS / SGD (beta1 of AdamW)."""
    warmup_epochs: float = 10.0
    augment: bool = True
    """RandomResizedCrop + flip on the training images (paper); false enables the feature cache."""
    crop_min_scale: float = 0.08
    crop: str = "official"
    """official: the official probe's crop, one draw of area and aspect clipped to the image (util/crop.py; mean
    crop area about 0.52 of an ImageNet image); torchvision: RandomResizedCrop's up to 10 draws, else a center
    crop (about 0.44)."""
    train_blocks: int = 0
    """Partial fine-tuning (paper Fig. 9): also tune the last K blocks and the final norm; 0 = linear probe."""
    cache_features: bool = True
    """Extract features once when nothing upstream of the head changes (augment false, train_blocks 0)."""
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    output: str = "runs/linprobe"
    log_every: int = 10
    eval_every: int = 1

    def __post_init__(self) -> None:
        _check_common(self)
        _check_source(self, scratch_allowed=False)
        apply_global_batch(self)
        _check_training(self)
        _check(self.optimizer in PROBE_OPTIMIZERS, "optimizer", self.optimizer, f"one of {PROBE_OPTIMIZERS}")
        _check(self.crop in RESIZED_CROPS, "crop", self.crop, f"one of {', '.join(RESIZED_CROPS)}")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, "at least 2 (the head has BatchNorm)")

    @property
    def uses_cache(self) -> bool:
        """True when the encoder's output for an image never changes during training."""
        return self.cache_features and not self.augment and self.train_blocks == 0

    def effective_batch(self, world_size: int = 1) -> int:
        return self.batch_size * world_size

    def resolved_lr(self, world_size: int = 1) -> float:
        """Peak lr: ``lr`` if set, else ``base_lr * global batch / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.effective_batch(world_size) / 256


@dataclass(frozen=True)
class KnnConfig:
    """Weighted kNN (k=20, T=0.07) on L2-normalized frozen features: train split votes for test."""

    checkpoint: str | None = None
    model: str | None = None
    """Optional preset checked against the checkpoint's architecture."""
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    pool: str = "cls"
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    """Images per feature-extraction batch."""
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    output: str = "runs/knn"

    def __post_init__(self) -> None:
        _check_common(self)
        _check_source(self, scratch_allowed=False)
        _check(self.k >= 1, "k", self.k, "a positive int")
        _check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "a positive int")


EMBED_FORMATS = (".safetensors", ".npy")
"""Output files of ``maelab embed``, by suffix."""


@dataclass(frozen=True)
class EmbedConfig:
    """Frozen features (class token or patch-token mean) of every image of a folder, in its sorted scan order."""

    checkpoint: str | None = None
    """Pre-trained weights: run directory, maelab .pt, official MAE .pth, exported .safetensors or an HF directory."""
    model: str | None = None
    """Optional preset checked against the checkpoint's architecture."""
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    """data.name: the image folder (labeled ImageFolder or any tree of images); data.strict: stop at the first
    unreadable image instead of skipping it; data.crop_pct / mean / std: the evaluation transform."""
    pool: str = "cls"
    """cls: class token after the final norm; avg: mean of the normed patch tokens."""
    batch_size: int = 256
    """Images per batch (per process under torchrun)."""
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32; the features are stored as float32."""
    seed: int = 0
    output: str | None = None
    """The features file, .safetensors (tensors features [N, D] and labels [N]) or .npy (features; labels in
    <stem>.labels.npy); <stem>.files.txt lists the images, <stem>.skipped.txt the unreadable ones."""

    def __post_init__(self) -> None:
        _check_common(self)
        _check_source(self, scratch_allowed=False)
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "a positive int")
        _check(
            bool(self.output) and str(self.output).endswith(EMBED_FORMATS),
            "output",
            self.output,
            f"required: a file ending in {' or '.join(EMBED_FORMATS)}; pass --output",
        )
