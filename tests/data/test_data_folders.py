"""ImageFolderDataset: labeled and unlabeled trees, dirty files, strict and lenient reads."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from maelab.data import ImageFolderDataset, default_stats, pretrain_transform
from maelab.errors import DataError


def _img(path, color=(10, 20, 30), size=(8, 6), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)
    return path


def _labeled(root):
    _img(root / "cat" / "a.png", (255, 0, 0))
    _img(root / "cat" / "sub" / "b.jpg", (250, 0, 0))
    _img(root / "dog" / "c.PNG", (0, 255, 0))
    _img(root / "emu" / "d.bmp", (0, 0, 255))
    return root


def test_labeled_classes(tmp_path):
    root = _labeled(tmp_path / "data")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "._c.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    ds = ImageFolderDataset(root)
    assert ds.labeled and ds.classes == ["cat", "dog", "emu"]
    assert len(ds) == 4 and sorted(ds.targets) == [0, 0, 1, 2]
    img, label = ds[len(ds) - 1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 2


def test_unlabeled_recursive(tmp_path):
    root = tmp_path / "pile"
    _img(root / "x.png")
    _img(root / "deep" / "er" / "y.jpeg")
    _img(root / "deep" / "z.webp")
    _img(root / ".hidden" / "skip.png")
    ds = ImageFolderDataset(root)
    assert not ds.labeled and ds.classes == [] and len(ds) == 3
    assert all(ds[i][1] == -1 for i in range(3))


def test_single_subfolder_is_unlabeled(tmp_path):
    _img(tmp_path / "only" / "a.png")
    _img(tmp_path / "only" / "b.png")
    ds = ImageFolderDataset(tmp_path)
    assert not ds.labeled and len(ds) == 2


def test_channels_and_transform(tmp_path):
    root = _labeled(tmp_path)
    mean, std = default_stats(1)
    ds = ImageFolderDataset(root, transform=pretrain_transform(16, mean, std), channels=1)
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y == 0


@pytest.mark.parametrize("make", ["missing", "empty", "only_text", "file"])
def test_missing_or_empty_folder(tmp_path, make):
    root = tmp_path / "d"
    if make == "empty":
        root.mkdir()
    elif make == "only_text":
        (root / "a").mkdir(parents=True)
        (root / "a" / "readme.txt").write_text("hi")
    elif make == "file":
        root.write_text("x")
    with pytest.raises(DataError, match=r"d\b.*\.jpg.*\.png"):
        ImageFolderDataset(root)


def _dirty(root):
    _img(root / "a_good.png", (1, 1, 1))
    (root / "b_zero.jpg").write_bytes(b"")
    (root / "c_text.png").write_text("plain text, not a PNG")
    (root / "d_noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 999, np.uint8).tobytes())
    _img(root / "e_good.png", (2, 2, 2))
    return root


def test_strict_raises_naming_file(tmp_path):
    ds = ImageFolderDataset(_dirty(tmp_path), strict=True)
    assert np.asarray(ds[0][0])[0, 0, 0] == 1
    with pytest.raises(DataError, match="b_zero.jpg"):
        ds[1]


def test_lenient_skips_and_counts(tmp_path, caplog):
    ds = ImageFolderDataset(_dirty(tmp_path))
    with caplog.at_level(logging.WARNING, logger="maelab.data.folders"):
        values = [int(np.asarray(ds[i][0])[0, 0, 0]) for i in range(len(ds))]
    assert values == [1, 2, 2, 2, 2]  # bad items replaced by the next readable one
    assert ds.num_skipped == 3
    assert "b_zero.jpg" in caplog.text and "c_text.png" in caplog.text
    assert np.asarray(ds[1][0])[0, 0, 0] == 2 and ds.num_skipped == 3  # known-bad not retried


def test_lenient_wraps_around_and_warning_cap(tmp_path, caplog):
    root = tmp_path / "r"
    _img(root / "a.png", (7, 7, 7))
    for i in range(12):
        (root / f"bad{i:02d}.png").write_bytes(b"nope")
    ds = ImageFolderDataset(root)
    with caplog.at_level(logging.WARNING, logger="maelab.data.folders"):
        assert np.asarray(ds[5][0])[0, 0, 0] == 7  # wraps past the end to a.png
    assert ds.num_skipped == 12 - 4
    named = [r for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(named) == 5
    assert any("skipped 8 unreadable" in r.getMessage() for r in caplog.records)


def test_all_bad_raises(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="no readable image"):
        ds[0]


def test_mixed_modes_in_folder(tmp_path):
    _img(tmp_path / "gray.png", (100,), mode="L")
    Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (3, 3)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (3, 3)).convert("P").save(tmp_path / "pal.gif")
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "deep.tif")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.ppm")
    mean, std = default_stats(3)
    ds = ImageFolderDataset(tmp_path, transform=pretrain_transform(8, mean, std), strict=True)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and y == -1
    assert len(ds) == 6


def test_forced_classes_keep_indices(tmp_path):
    _img(tmp_path / "dog" / "a.png")
    _img(tmp_path / "emu" / "b.png")
    ds = ImageFolderDataset(tmp_path, classes=["cat", "dog", "emu"])
    assert ds.classes == ["cat", "dog", "emu"] and ds.targets == [1, 2]


def test_large_image_through_transform_no_bomb_warning(tmp_path):
    Image.new("L", (12000, 9000), 60).save(tmp_path / "big.jpg", quality=50)
    mean, std = default_stats(3)
    ds = ImageFolderDataset(tmp_path, transform=pretrain_transform(32, mean, std), target_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, _ = ds[0]
    assert x.shape == (3, 32, 32)


@pytest.mark.slow
def test_large_image_full_resolution_transform(tmp_path):
    Image.new("L", (12000, 9000), 60).save(tmp_path / "big.jpg", quality=50)
    ds = ImageFolderDataset(tmp_path, transform=pretrain_transform(32, (0.5,), (0.5,), min_scale=0.95), channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        x, _ = ds[0]
    assert x.shape == (1, 32, 32)
