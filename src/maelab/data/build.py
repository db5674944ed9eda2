"""One entry point from a :class:`~maelab.config.DataConfig` to a dataset.

``cfg.name`` picks the source: ``synthetic``, ``cifar10``, ``cifar100``, ``stl10`` (known
names win over folders of the same name), WebDataset shards (``*.tar`` patterns or a directory
written by ``maelab shard``), a saved Hugging Face dataset, or a path to an image folder. Items are
``(transform(image), int label)``: with a transform from :mod:`maelab.data.transforms`
that is ``(float tensor [C, H, W], label)``; label -1 means unlabeled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision.datasets import STL10

from maelab.config import DataConfig
from maelab.data.folders import ImageFolderDataset, find_image_classes
from maelab.data.hf_datasets import HFImageDataset, is_hf_dataset_dir, load_hf_table
from maelab.data.shards import ShardSamples, ShardStream, is_shard_spec
from maelab.data.synthetic import SyntheticShapes
from maelab.data.torchvision_sets import TORCHVISION_SETS, build_torchvision_dataset
from maelab.data.transforms import pair_size
from maelab.errors import DataError

log = logging.getLogger(__name__)

SYNTHETIC_TEST_SEED_OFFSET = 1_000_003
"""The synthetic test split uses seed + this, so it never repeats training draws."""
TRAIN_SPLIT_DIRS = ("train",)
EVAL_SPLIT_DIRS = ("test", "val", "valid", "validation")
"""Folders tried, in order, for ``train=False`` when the root holds split folders."""


class _ToChannels:
    """PIL image -> mode 'L' (1 channel) or 'RGB' (3), then the wrapped transform."""

    def __init__(self, channels: int, transform: Callable[[Any], Any] | None) -> None:
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transform

    def __call__(self, img: Image.Image) -> Any:
        img = img.convert(self.mode)
        return self.transform(img) if self.transform is not None else img


def decode_size(img_size: int | tuple[int, int], min_scale: float) -> int:
    """Smallest short side an image may be decoded at without losing crop detail.

    The smallest RandomResizedCrop (area ``min_scale``, aspect 3/4) of an image whose
    short side is this still has sides >= ``img_size``, so it is never upsampled.
    """
    return math.ceil(max(pair_size(img_size)) / math.sqrt(min_scale * 0.75))


def _has_split_dirs(root: Path) -> bool:
    return any((root / d).is_dir() for d in TRAIN_SPLIT_DIRS + EVAL_SPLIT_DIRS)


def _folder_dataset(
    cfg: DataConfig,
    root: Path,
    img_size: int | tuple[int, int],
    in_chans: int,
    train: bool,
    transform: Callable[[Any], Any] | None,
) -> Dataset:
    """ImageFolderDataset for ``root``, choosing ``train/`` / ``test/`` (``val/``) if present."""
    if in_chans not in (1, 3):
        raise DataError(f"image folder {root} gives 1 or 3 channels, but model.in_chans={in_chans}")
    folder, classes = root, None
    if _has_split_dirs(root):
        train_dir = root / cfg.split
        if train:
            if not train_dir.is_dir():
                raise DataError(
                    f"no {cfg.split}/ folder in {root} (data.split={cfg.split!r}); "
                    f"it has: {', '.join(sorted(p.name for p in root.iterdir() if p.is_dir()))}"
                )
            folder = train_dir
        else:
            found = [root / d for d in EVAL_SPLIT_DIRS if (root / d).is_dir()]
            if not found:
                raise DataError(
                    f"no evaluation split in {root}: add a {'/, '.join(EVAL_SPLIT_DIRS)}/ folder beside {cfg.split}/"
                )
            folder = found[0]
            if train_dir.is_dir():  # same class indices as the training split
                classes = find_image_classes(train_dir) or None
        log.info("using %s split folder %s", "training" if train else "evaluation", folder)
    elif not train:
        log.warning("image folder %s has no test/ or val/ folder: evaluating on the same images", root)
    return ImageFolderDataset(
        folder,
        transform=transform,
        channels=in_chans,
        strict=cfg.strict,
        target_size=decode_size(img_size, cfg.min_scale),
        classes=classes,
    )


def build_dataset(
    cfg: DataConfig,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    train: bool,
    transform: Callable[[Any], Any] | None,
    seed: int = 0,
) -> Dataset:
    """The dataset ``cfg.name`` names, for the training (``train=True``) or test split.

    Args:
        cfg: data section of the config (name, root, download, split, strict, ...).
        img_size: model input size; int or (height, width). Sets the synthetic image size
            and the reduced decode size of huge images in folders.
        in_chans: channels; any for synthetic, 1 or 3 for folders and torchvision sets.
        train: training split, else the test split (synthetic: a disjoint draw of
            ``num_samples // 4`` images; folders: ``test/`` or ``val/``).
        transform: per-sample transform (applied to a PIL image, or to a uint8 tensor
            [C, H, W] for synthetic).
        seed: synthetic data seed.

    Raises:
        DataError: unknown name, missing folder or files, unusable channel count.
    """
    ds = _build_split(cfg, img_size=img_size, in_chans=in_chans, train=train, transform=transform, seed=seed)
    return limit_samples(ds, cfg.max_samples) if cfg.max_samples else ds


def limit_samples(ds: Dataset, n: int) -> Dataset:
    """At most ``n`` items of ``ds``, evenly spaced (``data.max_samples``). An image folder keeps its type (its
    ``samples`` list is thinned, so every data path still applies); other datasets become a ``Subset``."""
    if isinstance(ds, ShardStream):
        raise DataError("data.max_samples needs an indexable dataset, not WebDataset shards: set it to 0")
    total = len(ds)  # type: ignore[arg-type]
    if n >= total:
        return ds
    picked = [int(i * total / n) for i in range(n)]
    if type(ds) is ImageFolderDataset:
        ds.samples = [ds.samples[i] for i in picked]
        return ds
    return Subset(ds, picked)


def _build_split(
    cfg: DataConfig,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    train: bool,
    transform: Callable[[Any], Any] | None,
    seed: int,
) -> Dataset:
    name = cfg.name
    key = name.lower()
    if key == "synthetic":
        size = img_size if isinstance(img_size, int) else pair_size(img_size)
        if train:
            return SyntheticShapes(cfg.num_samples, size, in_chans, cfg.num_classes, seed, transform)
        return SyntheticShapes(
            max(1, cfg.num_samples // 4), size, in_chans, cfg.num_classes, seed + SYNTHETIC_TEST_SEED_OFFSET, transform
        )
    if key in TORCHVISION_SETS:
        if in_chans not in (1, 3):
            raise DataError(f"{key} has RGB images: model.in_chans must be 3 (or 1), not {in_chans}")
        wrapped = transform if in_chans == 3 else _ToChannels(in_chans, transform)
        return build_torchvision_dataset(
            key, cfg.root, train=train, download=cfg.download, transform=wrapped, split=cfg.split
        )
    if is_shard_spec(name):
        return _shard_stream(cfg, img_size, in_chans, train, transform, seed)
    root = Path(name).expanduser()
    if not root.is_dir():
        raise DataError(
            f"unknown dataset or missing folder {name!r}: use synthetic, cifar10, cifar100, stl10, "
            "an image folder, WebDataset shards (*.tar) or a saved Hugging Face dataset"
        )
    if is_hf_dataset_dir(root):
        return _hf_dataset(cfg, root, img_size, in_chans, train, transform)
    return _folder_dataset(cfg, root, img_size, in_chans, train, transform)


def image_rows(
    cfg: DataConfig, img_size: int | tuple[int, int], in_chans: int, transform: Callable[[Any], Any] | None
) -> ImageFolderDataset:
    """Every image of the folder, saved Hugging Face dataset or WebDataset shards ``cfg.name`` once, in stored
    order, as an indexable :class:`ImageFolderDataset` (its skip/strict policy; ``samples`` name the images).

    Raises:
        DataError: missing or unreadable data, no images."""
    name, target_size = cfg.name, decode_size(img_size, cfg.min_scale)
    if is_shard_spec(name):
        return ShardSamples(name, transform=transform, channels=in_chans, strict=cfg.strict, target_size=target_size)
    root = Path(name).expanduser()
    if is_hf_dataset_dir(root):
        return _hf_dataset(cfg, root, img_size, in_chans, True, transform)
    return ImageFolderDataset(name, transform=transform, channels=in_chans, strict=cfg.strict, target_size=target_size)


def _hf_dataset(
    cfg: DataConfig,
    root: Path,
    img_size: int | tuple[int, int],
    in_chans: int,
    train: bool,
    transform: Callable[[Any], Any] | None,
) -> HFImageDataset:
    """The saved Hugging Face dataset ``root``: split ``cfg.split`` (training) or its test/validation split."""
    return HFImageDataset(
        load_hf_table(root, cfg.split, train),
        root,
        transform=transform,
        channels=in_chans,
        strict=cfg.strict,
        target_size=decode_size(img_size, cfg.min_scale),
        image_column=cfg.image_column,
    )


def _shard_stream(
    cfg: DataConfig,
    img_size: int | tuple[int, int],
    in_chans: int,
    train: bool,
    transform: Callable[[Any], Any] | None,
    seed: int,
) -> ShardStream:
    """This rank's :class:`~maelab.data.shards.ShardStream` of the shards ``cfg.name`` (training only)."""
    if not train:
        raise DataError(
            f"WebDataset shards {cfg.name!r} are read for pre-training only: evaluate on an image "
            "folder or a saved Hugging Face dataset"
        )
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return ShardStream(
        cfg.name,
        transform=transform,
        channels=in_chans,
        strict=cfg.strict,
        target_size=decode_size(img_size, cfg.min_scale),
        seed=seed,
        rank=rank,
        world_size=world,
    )


def dataset_info(ds: Dataset) -> tuple[int | None, bool]:
    """``(num_classes, labeled)`` of a dataset built here (Subsets are looked through).

    ``labeled`` is True when every item has a real label (>= 0); ``num_classes`` is the
    class count when any item is labeled, else None.
    """
    while isinstance(ds, Subset):
        ds = ds.dataset
    if isinstance(ds, ConcatDataset):
        infos = [dataset_info(d) for d in ds.datasets]
        counts = {n for n, _ in infos if n is not None}
        return (max(counts) if counts else None), all(lab for _, lab in infos)
    if isinstance(ds, STL10):
        if ds.split == "unlabeled":
            return None, False
        return len(ds.classes), ds.split in ("train", "test")
    classes = getattr(ds, "classes", None)
    labeled = bool(getattr(ds, "labeled", bool(classes)))
    if not classes or not labeled:
        return None, False
    return len(classes), True
