"""Hugging Face ``datasets`` on disk: a ``save_to_disk`` directory or a directory of parquet files.

Only local files are read (``datasets.load_from_disk`` / the ``parquet`` builder on local files),
never the hub. The image column is the first ``Image`` feature (or ``data.image_column``), labels
come from the first ``ClassLabel`` column when there is one. :class:`HFImageDataset` is map-style and
has the skip/strict policy of image folders, so it goes through the same resumable sampler and
per-sample seeding (exact resume holds as for folders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from maelab.data.folders import ImageFolderDataset
from maelab.data.images import load_image
from maelab.errors import DataError

SAVED_FILES = ("state.json", "dataset_dict.json")
"""One of these marks a ``save_to_disk`` directory (a Dataset, a DatasetDict)."""


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError("Hugging Face datasets need the datasets package: pip install 'maelab[shards]'") from e
    return datasets


def _parquet_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.parquet")) or sorted((root / "data").glob("*.parquet"))


def is_hf_dataset_dir(root: Path) -> bool:
    """Whether ``root`` is a ``save_to_disk`` directory or holds parquet files (directly or in ``data/``)."""
    return root.is_dir() and (any((root / f).is_file() for f in SAVED_FILES) or bool(_parquet_files(root)))


def _pick_split(splits: Sequence[str], root: Path, split: str, train: bool) -> str | None:
    """The split to read: ``split`` for training, else the first of test/validation/val present (None: the
    one set there is). DataError when the split asked for is missing."""
    from maelab.data.build import EVAL_SPLIT_DIRS

    if not splits:
        return None
    wanted = [split] if train else [s for s in EVAL_SPLIT_DIRS if s in splits]
    found = [s for s in wanted if s in splits]
    if not found:
        what = f"no split {split!r} (data.split)" if train else "no test/validation split"
        raise DataError(f"{root}: {what}; it has: {', '.join(splits)}")
    return found[0]


def load_hf_table(root: Path, split: str, train: bool) -> Any:
    """The ``datasets.Dataset`` of ``split`` (or the evaluation split) saved in ``root``."""
    datasets = _datasets()
    try:
        if any((root / f).is_file() for f in SAVED_FILES):
            saved = datasets.load_from_disk(str(root))
            if isinstance(saved, datasets.DatasetDict):
                return saved[_pick_split(list(saved), root, split, train)]
            return saved
        files = _parquet_files(root)
        by_split: dict[str, list[str]] = {}
        for f in files:  # hub layout: <split>-00000-of-00002.parquet
            by_split.setdefault(f.name.split("-")[0], []).append(str(f))
        chosen = _pick_split(list(by_split), root, split, train) if len(by_split) > 1 else None
        data_files = by_split[chosen] if chosen else [str(f) for f in files]
        return datasets.load_dataset("parquet", data_files=data_files, split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable saved dataset is a data problem
        raise DataError(f"cannot read the Hugging Face dataset {root}: {e}") from e


class _Rows(Sequence[tuple[str, int]]):
    """``samples`` of an :class:`HFImageDataset`: ``("ROOT/row<i>", label)`` without materializing names."""

    def __init__(self, root: Path, targets: list[int]) -> None:
        self.root, self.targets = root, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[str, int]:  # type: ignore[override]
        return f"{self.root}/row{i}", self.targets[i]


class HFImageDataset(ImageFolderDataset):
    """Rows of a Hugging Face dataset as ``(transform(image), label)`` (label -1: unlabeled).

    The skip/strict policy, transform handling and ``__getitem__`` are :class:`ImageFolderDataset`'s; rows
    stand in for files (``samples[i] = ("ROOT/row<i>", label)``, the name errors and ``maelab embed`` use).

    Args:
        table: a ``datasets.Dataset``. root: where it was read from. image_column: the column with the
        images (default: the first ``Image`` feature). The other arguments as for ImageFolderDataset.
    """

    def __init__(
        self,
        table: Any,
        root: Path,
        transform: Callable[[Image.Image], Any] | None = None,
        channels: int = 3,
        strict: bool = False,
        target_size: int | None = None,
        image_column: str | None = None,
    ) -> None:
        datasets = _datasets()
        features = table.features
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        column = image_column or (images[0] if images else None)
        if column not in features:
            raise DataError(
                f"{root}: no image column {column!r} (data.image_column); columns: {', '.join(features)}"
                if column
                else f"{root}: no Image column; set data.image_column (columns: {', '.join(features)})"
            )
        if channels not in (1, 3):
            raise DataError(f"Hugging Face dataset {root} gives 1 or 3 channels, not {channels}")
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        self.root, self.column = root, column
        self.transform, self.channels, self.strict, self.target_size = transform, channels, strict, target_size
        self.num_skipped, self._bad = 0, set()
        self.classes = list(features[labels[0]].names) if labels else []
        self.labeled = bool(self.classes)
        self.table = table.cast_column(column, datasets.Image(decode=False)).select_columns([column] + labels[:1])
        self.targets = [int(t) for t in table[labels[0]]] if labels else [-1] * len(table)
        self.samples = _Rows(root, self.targets)  # type: ignore[assignment]
        if not self.targets:
            raise DataError(f"no rows in the Hugging Face dataset {root}")

    def load(self, index: int) -> Image.Image:
        """Row ``index``'s image ('RGB' or 'L'), no transform and no skipping; DataError if unreadable."""
        cell = self.table[index][self.column] or {}
        data = cell.get("bytes") or cell.get("path") or b""
        return load_image(data, channels=self.channels, target_size=self.target_size, name=self.samples[index][0])
