"""Image folders: an ImageFolder tree (``root/<class>/**/img``) or any tree of images.

A root whose images all live in two or more class subfolders is *labeled* (classes are
the sorted subfolder names, as in torchvision's ``ImageFolder``); any other tree is
scanned recursively and is *unlabeled* (label -1). Hidden files and folders (names
starting with '.', e.g. macOS ``._x.jpg`` resource forks) are ignored.

Unreadable files are found when read, not when scanned (scanning a million files must be
cheap): with ``strict=False`` (default) a bad file is logged, counted in ``num_skipped``
and replaced by the next readable sample, so one broken file never stops an epoch; with
``strict=True`` it raises :class:`~maelab.errors.DataError` naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import make_dataset

from maelab.data.images import exceeds_pil_limit, load_image, pixel_limit_lifted
from maelab.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)
"""File extensions (case-insensitive) treated as images."""

MAX_NAMED_WARNINGS = 5
"""Unreadable files named in warnings per dataset copy (i.e. per worker process)."""


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan_images(directory: str) -> list[str]:
    """All image files under ``directory`` (recursive, sorted, following links)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_name(f))
    return out


def _not_found(root: Path, what: str) -> DataError:
    return DataError(f"{what} {root}: looked for files ending in {', '.join(IMG_EXTENSIONS)} (case-insensitive)")


def find_image_classes(root: str | Path) -> list[str]:
    """Class names of an ImageFolder-style root, or [] if it is not one.

    A root is labeled when it has no image files directly inside and at least two
    (non-hidden) subfolders contain images. Every non-hidden subfolder is then a class, so
    indices agree between splits even if a class folder happens to be empty.
    """
    root = Path(root)
    subdirs, loose = [], False
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_dir() and _visible(entry.name):
                subdirs.append(entry.name)
            elif entry.is_file() and _is_image_name(entry.name):
                loose = True
    if loose or len(subdirs) < 2:
        return []
    with_images = [d for d in subdirs if _has_image(root / d)]
    return sorted(subdirs) if len(with_images) >= 2 else []


def _has_image(directory: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        if any(_is_image_name(f) for f in filenames):
            return True
    return False


def warn_skipped(n: int, err: DataError, where: object) -> None:
    """Log the ``n``-th unreadable image skipped in ``where``: named for the first few, then counted."""
    if n <= MAX_NAMED_WARNINGS:
        log.warning("skipping unreadable image (%d so far): %s", n, err)
    if n == MAX_NAMED_WARNINGS:
        log.warning("further unreadable images are only counted (attribute num_skipped)")
    elif n > MAX_NAMED_WARNINGS and n & (n - 1) == 0:
        log.warning("skipped %d unreadable images so far in %s", n, where)


class ImageFolderDataset(Dataset):
    """Images from a folder tree, labeled by class subfolder or unlabeled (label -1).

    Args:
        root: folder to read.
        transform: applied to the PIL image (e.g. ``pretrain_transform``); without one,
            items are ``(PIL.Image, label)``.
        channels: 1 ('L') or 3 ('RGB').
        strict: raise on the first unreadable file instead of skipping it.
        target_size: passed to :func:`~maelab.data.images.load_image`: huge images may be
            decoded at a reduced size whose short side stays >= target_size.
        classes: force this class list (e.g. the train split's, so a test split with a
            missing class folder keeps the same indices). Implies a labeled dataset.

    Attributes:
        classes: class names (empty when unlabeled). labeled: whether labels are real.
        samples: list of (path, label). num_skipped: unreadable reads replaced so far
            in this process.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        channels: int = 3,
        strict: bool = False,
        target_size: int | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "not a folder:" if self.root.exists() else "image folder not found:"
            raise _not_found(self.root, what)
        if channels not in (1, 3):
            raise DataError(f"image folder {self.root} gives 1 or 3 channels, not {channels}")
        self.transform = transform
        self.channels = channels
        self.strict = strict
        self.target_size = target_size
        self.num_skipped = 0
        self._bad: set[int] = set()

        self.classes: list[str] = list(classes) if classes is not None else find_image_classes(self.root)
        self.labeled = bool(self.classes)
        if self.labeled:
            class_to_idx = {c: i for i, c in enumerate(self.classes)}
            present = {c: i for c, i in class_to_idx.items() if (self.root / c).is_dir()}
            root_str = str(self.root)

            def valid(path: str) -> bool:
                rel = os.path.relpath(path, root_str).split(os.sep)
                return _is_image_name(rel[-1]) and all(_visible(p) for p in rel[:-1])

            self.samples: list[tuple[str, int]] = make_dataset(root_str, present, is_valid_file=valid, allow_empty=True)
            empty = [c for c in self.classes if c not in {self.classes[t] for _, t in self.samples}]
            if empty and self.samples:
                log.warning("image folder %s: class folder(s) without images: %s", self.root, ", ".join(empty))
            if set(self.classes) <= {"train", "test", "val", "valid", "validation"}:
                log.warning(
                    "image folder %s has only split folders (%s) used as classes; point at one split instead",
                    self.root,
                    ", ".join(self.classes),
                )
        else:
            self.samples = [(p, -1) for p in scan_images(str(self.root))]
        if not self.samples:
            raise _not_found(self.root, "no images in")
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """File ``index`` as a PIL image ('RGB' or 'L'), no transform and no skipping; DataError if unreadable."""
        return load_image(self.samples[index][0], channels=self.channels, target_size=self.target_size)

    def _skip(self, index: int, err: DataError) -> None:
        self._bad.add(index)
        self.num_skipped += 1
        warn_skipped(self.num_skipped, err, self.root)

    def first_readable(self, index: int, read: Callable[[int], T]) -> tuple[int, T]:
        """``(i, read(i))`` for the first ``i`` from ``index`` on (wrapping) that ``read`` accepts.

        This is the skip/strict policy of the dataset for any reader (``read`` raises
        :class:`~maelab.errors.DataError` for an unreadable file): with ``strict`` the first
        failure raises; otherwise the file is counted, warned about, remembered and the next
        one tried. ``__getitem__`` uses it with the PIL loader, the GPU-decode path
        (:mod:`maelab.data.jpeg_gpu`) with a reader of the encoded bytes.
        """
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            out = self.try_read(i, read)
            if out is not None:
                return i, out
        raise DataError(f"no readable image in {self.root}: all {n} files failed to load (see the warnings above)")

    def try_read(self, index: int, read: Callable[[int], T]) -> T | None:
        """``read(index)``, or None when file ``index`` is unreadable (counted, warned about and
        remembered); with ``strict`` the :class:`~maelab.errors.DataError` propagates instead.

        The skip/strict policy without substitution: :func:`first_readable` moves on to the next
        file, ``maelab embed`` leaves the file out (:mod:`maelab.eval.embed`)."""
        try:
            return read(index)
        except DataError as e:
            if self.strict:
                raise
            self._skip(index, e)
            return None

    def apply_transform(self, img: Image.Image) -> Any:
        """``transform(img)`` (``img`` itself without a transform), Pillow's size check lifted for huge images."""
        if self.transform is None:
            return img
        if exceeds_pil_limit(img):  # Pillow re-checks the size when cropping
            with pixel_limit_lifted():
                return self.transform(img)
        return self.transform(img)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        i, img = self.first_readable(index, self.load)
        return self.apply_transform(img), self.samples[i][1]
