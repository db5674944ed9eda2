"""build_dataset / dataset_info: every source, split selection, and clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import datasets

from maelab.config import DataConfig
from maelab.data import build_dataset, dataset_info, default_stats, eval_transform, pretrain_transform
from maelab.data.torchvision_sets import build_torchvision_dataset
from maelab.errors import DataError

SHARED_CIFAR10 = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10").resolve()


def _tf(size=16, chans=3):
    mean, std = default_stats(chans)
    return pretrain_transform(size, mean, std)


def _img(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), color).save(path)


def _split_root(root):
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("ant", "bee"):
            for i in range(n):
                _img(root / split / cls / f"{i}.png")
    return root


def test_synthetic_train_and_test_splits():
    cfg = DataConfig(name="synthetic", num_samples=40, num_classes=4)
    tr = build_dataset(cfg, img_size=(16, 24), in_chans=5, train=True, transform=_tf((16, 24), 5), seed=3)
    te = build_dataset(cfg, img_size=(16, 24), in_chans=5, train=False, transform=_tf((16, 24), 5), seed=3)
    assert len(tr) == 40 and len(te) == 10
    x, y = tr[1]
    assert x.shape == (5, 16, 24) and x.dtype == torch.float32 and y == 1
    assert dataset_info(tr) == (4, True)
    raw_tr, raw_te = tr.raw(0)[0], te.raw(0)[0]
    assert not torch.equal(raw_tr, raw_te)  # disjoint draws


def test_folder_split_selection(tmp_path):
    root = _split_root(tmp_path / "ds")
    cfg = DataConfig(name=str(root))
    tr = build_dataset(cfg, img_size=16, in_chans=3, train=True, transform=_tf())
    te = build_dataset(cfg, img_size=16, in_chans=3, train=False, transform=_tf())
    assert len(tr) == 4 and len(te) == 2
    assert Path(tr.root).name == "train" and Path(te.root).name == "test"
    assert dataset_info(tr) == (2, True) and dataset_info(te) == (2, True)
    x, y = te[1]
    assert x.shape == (3, 16, 16) and y == 1


def test_folder_val_split_and_class_indices_follow_train(tmp_path):
    root = tmp_path / "ds"
    for cls in ("ant", "bee", "cow"):
        _img(root / "train" / cls / "0.png")
    _img(root / "val" / "bee" / "0.png")
    _img(root / "val" / "cow" / "0.png")
    cfg = DataConfig(name=str(root))
    te = build_dataset(cfg, img_size=16, in_chans=3, train=False, transform=None)
    assert Path(te.root).name == "val" and te.classes == ["ant", "bee", "cow"]
    assert te.targets == [1, 2]


def test_folder_without_splits_used_for_both(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.png")
    cfg = DataConfig(name=str(tmp_path))
    for train in (True, False):
        ds = build_dataset(cfg, img_size=8, in_chans=1, train=train, transform=_tf(8, 1))
        assert len(ds) == 2 and dataset_info(ds) == (None, False)
        x, y = ds[0]
        assert x.shape == (1, 8, 8) and y == -1


def test_folder_missing_eval_split(tmp_path):
    _img(tmp_path / "train" / "a.png")
    with pytest.raises(DataError, match="no evaluation split"):
        build_dataset(DataConfig(name=str(tmp_path)), img_size=8, in_chans=3, train=False, transform=None)


def test_folder_bad_channels(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(DataError, match="in_chans=4"):
        build_dataset(DataConfig(name=str(tmp_path)), img_size=8, in_chans=4, train=True, transform=None)


def test_unknown_dataset():
    with pytest.raises(DataError, match=r"unknown dataset or missing folder 'imagenet-1k'.*synthetic, cifar10"):
        build_dataset(DataConfig(name="imagenet-1k"), img_size=8, in_chans=3, train=True, transform=None)


@pytest.mark.parametrize(
    "split, expected",
    [("train", (10, True)), ("test", (10, True)), ("train+unlabeled", (10, False)), ("unlabeled", (None, False))],
)
def test_stl10_info(split, expected):
    ds = datasets.STL10.__new__(datasets.STL10)  # no files needed for the metadata
    ds.split, ds.classes = split, [f"c{i}" for i in range(10)]
    assert dataset_info(ds) == expected


def test_subset_info():
    ds = build_dataset(DataConfig(num_samples=8), img_size=8, in_chans=3, train=True, transform=None)
    assert dataset_info(Subset(ds, [0, 1])) == (10, True)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_missing_files(tmp_path, name):
    cfg = DataConfig(name=name, root=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=f"{name} not found under .*nothing: pass --download"):
        build_dataset(cfg, img_size=32, in_chans=3, train=True, transform=None)
    assert not (tmp_path / "nothing").exists()  # nothing created, nothing downloaded


def test_torchvision_bad_split(tmp_path):
    with pytest.raises(DataError, match="stl10"):
        build_torchvision_dataset("stl10", tmp_path, train=True, download=False, transform=None, split="bogus")
    with pytest.raises(DataError, match="cifar10"):
        build_torchvision_dataset("cifar10", tmp_path, train=True, download=False, transform=None, split="unlabeled")


def _fake_cifar10(root: Path, n: int = 4) -> None:
    base = root / datasets.CIFAR10.base_folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for fname, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        with open(base / fname, "wb") as f:
            pickle.dump(entry, f)
    with open(base / datasets.CIFAR10.meta["filename"], "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_on_disk_format(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path)
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(
        datasets.CIFAR10, "_load_meta", lambda self: setattr(self, "classes", [f"c{i}" for i in range(10)])
    )
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        cfg = DataConfig(name="cifar10", root=str(root))
        tr = build_dataset(cfg, img_size=32, in_chans=3, train=True, transform=_tf(32))
        assert len(tr) == 20 and dataset_info(tr) == (10, True)
        x, y = tr[3]
        assert x.shape == (3, 32, 32) and y == 3
    te = build_dataset(cfg, img_size=16, in_chans=1, train=False, transform=_tf(16, 1))
    assert len(te) == 4 and te[0][0].shape == (1, 16, 16)


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"no shared CIFAR-10 copy at {SHARED_CIFAR10}")
def test_shared_cifar10_folder():
    cfg = DataConfig(name=str(SHARED_CIFAR10))
    mean, std = default_stats(3)
    tr = build_dataset(cfg, img_size=32, in_chans=3, train=True, transform=eval_transform(32, mean, std, 1.0))
    assert dataset_info(tr) == (10, True)
    assert tr.classes[0] == "airplane" and Path(tr.root).name == "train"
    x, y = tr[len(tr) - 1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 9
    te = build_dataset(cfg, img_size=32, in_chans=3, train=False, transform=None)
    assert Path(te.root).name == "test" and len(te) < len(tr)


# ---------------------------------------------------------------------------------- data.max_samples
def test_max_samples_takes_evenly_spaced_images_of_each_split_and_keeps_a_folder_a_folder(tmp_path):
    from collections import Counter

    from PIL import Image as PILImage

    from maelab.config import DataConfig
    from maelab.data.folders import ImageFolderDataset

    for split in ("train", "test"):
        for cls in ("a", "b", "c", "d"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(6):
                PILImage.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    cfg = DataConfig(name=str(tmp_path), max_samples=8, num_workers=0)
    train = build_dataset(cfg, img_size=8, in_chans=3, train=True, transform=None)
    test = build_dataset(cfg, img_size=8, in_chans=3, train=False, transform=None)
    assert type(train) is ImageFolderDataset and len(train) == 8 and len(test) == 8  # GPU paths still apply
    assert Counter(t for _, t in train.samples) == {0: 2, 1: 2, 2: 2, 3: 2}  # class folders stay balanced
    assert [p.rsplit("/", 1)[-1] for p, _ in train.samples[:2]] == ["0.png", "3.png"]  # evenly spaced, not the first 8
    full = build_dataset(
        DataConfig(name=str(tmp_path), num_workers=0), img_size=8, in_chans=3, train=True, transform=None
    )
    assert len(full) == 24
    synth = build_dataset(DataConfig(max_samples=10), img_size=8, in_chans=3, train=True, transform=None)
    assert len(synth) == 10 and dataset_info(synth) == (10, True)
