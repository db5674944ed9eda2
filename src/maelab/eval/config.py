"""Typed, validated configs of the evaluation protocols (same engine as :mod:`maelab.config`).

- :class:`EncoderConfig`: what every evaluation of a pre-trained encoder has (``checkpoint``, ``pool``) besides
  the run fields of :class:`~maelab.config.RunConfig`.
- :class:`ClassifierConfig`: the training evaluations (a :class:`~maelab.config.TrainConfig` too):
  :class:`FinetuneConfig`, end-to-end (or partial) fine-tuning, defaults the paper's ViT-B recipe
  (He et al. 2022, Table 9); :class:`LinprobeConfig`, linear probing on frozen features (paper Table 10), or
  partial fine-tuning of the last ``train_blocks`` blocks with the probe's head.
- :class:`FeatureConfig`: the frozen-feature commands, :class:`KnnConfig` (weighted k-nearest-neighbour
  classification) and :class:`EmbedConfig` (features of every image of a folder, written to a file).

Read them with ``maelab.config.build_config(FinetuneConfig, file, overrides)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from maelab.config import (
    ERASE_MODES,
    MIXUP_MODES,
    POOLS,
    PROBE_OPTIMIZERS,
    DataConfig,
    RunConfig,
    TrainConfig,
    _check,
    check_betas,
    data_defaults,
    one_of,
)
from maelab.data.transforms import RESIZED_CROPS

DEFAULT_SCRATCH_MODEL = "mae_vit_tiny_patch4_32"
"""Architecture of ``from_scratch`` runs when no ``model`` is given (pre-training's default)."""
EMBED_FORMATS = (".safetensors", ".npy")
"""Output files of ``maelab embed``, by suffix."""


@dataclass(frozen=True, kw_only=True)
class EncoderConfig(RunConfig):
    """An evaluation of a pre-trained encoder: where its weights come from and how its tokens are pooled."""

    checkpoint: str | None = None
    """Pre-trained weights: a pre-training run directory, a maelab .pt, an official MAE .pth, an encoder exported by
    maelab export (.safetensors) or a Hugging Face directory."""
    pool: str = one_of(POOLS, "cls")
    """Feature pooling: cls, the class token after the final norm; avg, the mean of the normed patch tokens
    (fine-tuning: global average pooling + fc_norm)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_source()

    def check_source(self, hint: str = "") -> None:
        """ConfigError unless a checkpoint is named (``hint``: the alternative a protocol allows)."""
        _check(
            bool(self.checkpoint),
            "checkpoint",
            self.checkpoint,
            "required: a pre-training run directory, a maelab .pt, an official MAE .pth or an exported "
            f".safetensors{hint}; pass --checkpoint",
        )


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig(TrainConfig, EncoderConfig):
    """A classifier trained on a pre-trained encoder (fine-tuning, linear probing): the training loop's fields
    (:class:`~maelab.config.TrainConfig`) with the evaluations' crop scale and cadence."""

    data: DataConfig = data_defaults(min_scale=0.08)
    eval_every: int = 1
    """Epochs between evaluations (the last epoch is always evaluated)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.eval_every >= 1, "eval_every", self.eval_every, "a positive int")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(ClassifierConfig):
    """End-to-end fine-tuning of a pre-trained encoder as a timm ViT classifier.

    Defaults follow the paper's ViT-B recipe (Table 9): AdamW(0.9, 0.999), base lr 1e-3
    at batch 1024, weight decay 0.05, layer decay 0.75, 100 epochs with 5 warmup, drop
    path 0.1, RandAugment(9, 0.5), label smoothing 0.1, mixup 0.8, cutmix 1.0, random
    erasing 0.25, global average pooling, crops of at least 0.08 of the image. (The official repository later
    used base lr 5e-4 and layer decay 0.65 for ViT-B; see recipes/finetune_imagenet_vit_base_paper.yaml.)
    """

    pool: str = one_of(POOLS, "avg")
    epochs: int = 100
    base_lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    output: str = "runs/finetune"
    from_scratch: bool = False
    """Random (timm) initialization, ignoring any checkpoint: the paper's supervised baseline (pick model)."""
    img_size: int | tuple[int, int] | None = None
    """Fine-tuning resolution; null: the encoder's. Position embeddings are resampled if it differs."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (paper: 0.9, 0.999)."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i of L gets lr * layer_decay ** (L - i); 1.0 turns it off."""
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
    mixup_mode: str = one_of(MIXUP_MODES, "batch")
    """batch, pair or elem (timm Mixup)."""
    smoothing: float = 0.1
    """Label smoothing (folded into the soft targets when mixup/cutmix is on)."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy (RandAugment m9, mstd 0.5); null disables."""
    color_jitter: float | None = None
    """Color jitter strength (only used when auto_augment is null)."""
    reprob: float = 0.25
    """Random erasing probability."""
    remode: str = one_of(ERASE_MODES, "pixel")
    """Random erasing fill: const (zeros), rand (one random color per region) or pixel (random per pixel)."""
    recount: int = 1
    """Regions erased per image when random erasing applies."""
    ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it too."""
    ema_decay: float = 0.9999
    """Decay of the weights' moving average."""
    train_blocks: int | None = None
    """Partial fine-tuning (paper Fig. 9): tune only the last K blocks (+ final norm and head); null: all."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.img_size, list):
            object.__setattr__(self, "img_size", tuple(self.img_size))
        if isinstance(self.auto_augment, str) and self.auto_augment.strip().lower() in ("", "none", "off"):
            object.__setattr__(self, "auto_augment", None)
        super().__post_init__()
        _check(
            self.train_blocks is None or self.train_blocks >= 0,
            "train_blocks",
            self.train_blocks,
            "0 or more (the number of last blocks to tune), or null for all",
        )
        check_betas(self.betas)
        _check(0.0 < self.layer_decay <= 1.0, "layer_decay", self.layer_decay, "a number in (0, 1]")
        _check(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "a number in [0, 1)")
        _check(self.mixup >= 0, "mixup", self.mixup, "0 (off) or a positive alpha")
        _check(self.cutmix >= 0, "cutmix", self.cutmix, "0 (off) or a positive alpha")
        _check(0.0 <= self.mixup_prob <= 1.0, "mixup_prob", self.mixup_prob, "a number in [0, 1]")
        _check(0.0 <= self.mixup_switch_prob <= 1.0, "mixup_switch_prob", self.mixup_switch_prob, "a number in [0, 1]")
        if self.uses_mixup:
            _check(
                self.batch_size % 2 == 0,
                "batch_size",
                self.batch_size,
                "must be even when mixup/cutmix is on (timm Mixup pairs samples)",
            )
        _check(0.0 <= self.smoothing < 1.0, "smoothing", self.smoothing, "a number in [0, 1)")
        _check(0.0 <= self.reprob <= 1.0, "reprob", self.reprob, "a number in [0, 1]")
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
        _check(0.0 < self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a number in (0, 1)")

    def check_source(self, hint: str = "") -> None:
        if not self.from_scratch:  # from_scratch ignores a checkpoint (e.g. a recipe's)
            super().check_source(" (or from_scratch=true for the random-init baseline)")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass(frozen=True, kw_only=True)
class LinprobeConfig(ClassifierConfig):
    """Linear probing: frozen encoder, BatchNorm(affine=False) + Linear head.

    Defaults follow the paper (Table 10): class-token features, LARS with base lr 0.1
    (lr = 0.1 * batch / 256), no weight decay, 90 epochs with 10 warmup, RandomResizedCrop
    + flip. The paper's batch is 16384; the default here (256) fits any dataset. With
    ``augment: false`` and ``train_blocks: 0`` features are extracted once and the head is
    trained on the cache (same result as streaming, much faster).
    """

    epochs: int = 90
    batch_size: int = 256
    base_lr: float = 0.1
    weight_decay: float = 0.0
    warmup_epochs: float = 10.0
    output: str = "runs/linprobe"
    optimizer: str = one_of(PROBE_OPTIMIZERS, "lars")
    """lars (paper), sgd (momentum) or adamw."""
    momentum: float = 0.9
    """Momentum of LARS / SGD (beta1 of AdamW)."""
    augment: bool = True
    """RandomResizedCrop + flip on the training images (paper); false enables the feature cache."""
    crop: str = one_of(tuple(RESIZED_CROPS), "official")
    """official: the official probe's crop, one draw of area and aspect clipped to the image (util/crop.py; mean
    crop area about 0.52 of an ImageNet image); torchvision: RandomResizedCrop's up to 10 draws, else a center
    crop (about 0.44)."""
    train_blocks: int = 0
    """Partial fine-tuning (paper Fig. 9): also tune the last K blocks and the final norm; 0 = linear probe."""
    cache_features: bool = True
    """Extract features once when nothing upstream of the head changes (augment false, train_blocks 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.train_blocks >= 0, "train_blocks", self.train_blocks, "0 or more (the number of last blocks to tune)"
        )
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, "at least 2 (the head has BatchNorm)")

    @property
    def uses_cache(self) -> bool:
        """True when the encoder's output for an image never changes during training."""
        return self.cache_features and not self.augment and self.train_blocks == 0


@dataclass(frozen=True, kw_only=True)
class FeatureConfig(EncoderConfig):
    """The frozen-feature commands (kNN, embed): the encoder's features of every image, batch by batch."""

    batch_size: int = 256


@dataclass(frozen=True, kw_only=True)
class KnnConfig(FeatureConfig):
    """Weighted kNN (k=20, T=0.07) on L2-normalized frozen features: train split votes for test."""

    output: str = "runs/knn"
    k: int = 20
    """Neighbours voting for a test image."""
    temperature: float = 0.07
    """Vote weight exp(similarity / T)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.k >= 1, "k", self.k, "a positive int")
        _check(self.temperature > 0, "temperature", self.temperature, "a positive number")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(FeatureConfig):
    """Frozen features (class token or patch-token mean) of every image of a folder, in its sorted scan order.

    data.name: the image folder (labeled ImageFolder or any tree of images); data.strict: stop at the first
    unreadable image instead of skipping it; data.crop_pct / mean / std: the evaluation transform. The features
    are stored as float32 whatever the precision.
    """

    output: str | None = None
    """The features file, .safetensors (tensors features [N, D] and labels [N]) or .npy (features; labels in
    <stem>.labels.npy); <stem>.files.txt lists the images, <stem>.skipped.txt the unreadable ones."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            bool(self.output) and str(self.output).endswith(EMBED_FORMATS),
            "output",
            self.output,
            f"required: a file ending in {' or '.join(EMBED_FORMATS)}; pass --output",
        )
