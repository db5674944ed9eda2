"""CIFAR-10, CIFAR-100 and STL-10 through torchvision, with clear errors when missing.

Nothing is downloaded unless asked (``download=True``, i.e. ``data.download=true`` or
``--download``); a missing copy raises :class:`~maelab.errors.DataError` saying what to do.
``root`` may be the folder holding torchvision's files (``cifar-10-batches-py``, ...) or
that folder itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from maelab.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.cache/maelab/data"
"""Where torchvision datasets live unless ``data.root`` says otherwise."""

TORCHVISION_SETS: dict[str, Callable[..., Dataset]] = {  # torchvision dataset classes
    "cifar10": datasets.CIFAR10,
    "cifar100": datasets.CIFAR100,
    "stl10": datasets.STL10,
}
STL10_TRAIN_SPLITS = ("train", "unlabeled", "train+unlabeled")


def _resolve_root(name: str, root: str | Path | None) -> Path:
    path = Path(root if root is not None else DEFAULT_ROOT).expanduser()
    base = getattr(TORCHVISION_SETS[name], "base_folder", None)
    if base and path.name == base:  # pointed at cifar-10-batches-py itself
        path = path.parent
    return path


def build_torchvision_dataset(
    name: str,
    root: str | Path | None,
    train: bool,
    download: bool,
    transform: Callable[[Any], Any] | None,
    split: str | None = None,
) -> Dataset:
    """A torchvision dataset whose items are ``(transform(PIL RGB image), int label)``.

    Args:
        name: cifar10, cifar100 or stl10.
        root: data folder (None: ``~/.cache/maelab/data``).
        train: training split, else the test split.
        download: allow torchvision to download the files.
        transform: applied to the PIL image.
        split: for stl10 with ``train=True``: 'train' (labeled 5k, default), 'unlabeled'
            (100k, label -1) or 'train+unlabeled'; other datasets accept only 'train'.
            Ignored when ``train=False`` (always 'test').
    """
    name = name.lower()
    if name not in TORCHVISION_SETS:
        raise DataError(f"unknown torchvision dataset {name!r}: use {', '.join(TORCHVISION_SETS)}")
    path = _resolve_root(name, root)
    split = split or "train"
    cls = TORCHVISION_SETS[name]
    if name == "stl10":
        if train and split not in STL10_TRAIN_SPLITS:
            raise DataError(f"invalid data.split={split!r} for stl10: use one of {', '.join(STL10_TRAIN_SPLITS)}")
        kwargs: dict[str, Any] = {"split": split if train else "test"}
    else:
        if train and split != "train":
            raise DataError(
                f"invalid data.split={split!r} for {name}: only 'train' (the test split is used for evaluation)"
            )
        kwargs = {"train": train}
    if download:
        path.mkdir(parents=True, exist_ok=True)
    try:
        return cls(str(path), transform=transform, download=download, **kwargs)
    except RuntimeError as e:
        if download:
            raise DataError(f"{name} under {path} is incomplete or corrupt after download: {e}") from e
        raise DataError(
            f"{name} not found under {path}: pass --download (data.download=true) or point data.root at a copy"
        ) from e
    except OSError as e:  # network failure while downloading, unreadable files
        raise DataError(f"cannot load {name} under {path}: {e}") from e
