"""build_training_data: the path it picks (CPU DataLoader, GPU-resident, device JPEG decoding, shards), its
samplers and errors, and the fixed (unaugmented) images for reconstruction figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from maelab.config import DataConfig
from maelab.data.build import build_dataset
from maelab.data.jpeg_gpu import JPEGDecodeLoader
from maelab.data.loader import ResumableSampler, build_loader
from maelab.data.loaders import BatchLoader, GPUBatchLoader
from maelab.data.pipeline import TrainingData, build_training_data, plan_training_set
from maelab.data.prefetch import DeviceBatches, normalize_uint8
from maelab.data.resident import Uint8Image
from maelab.data.synthetic import SyntheticShapes
from maelab.data.transforms import eval_transform, pretrain_transform
from maelab.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CPU = torch.device("cpu")


def _views(num_samples: int, crop_pct: float | str = 1.0) -> SyntheticShapes:
    """The training set of :func:`_data` with the evaluation transform."""
    tf = eval_transform(32, MEAN, STD, crop_pct)
    return build_dataset(DataConfig(num_samples=num_samples), img_size=32, in_chans=3, train=True, transform=tf, seed=7)


def _data(batch_size: int = 16, device: torch.device = CPU, rank: int = 0, world_size: int = 1, **kw) -> TrainingData:
    cfg = DataConfig(**{"num_samples": 64, "num_workers": 0, **kw})
    return build_training_data(
        cfg,
        img_size=32,
        in_chans=3,
        mean=MEAN,
        std=STD,
        batch_size=batch_size,
        seed=7,
        device=device,
        rank=rank,
        world_size=world_size,
        progress=False,
    )


def _folder(root: Path, n: int = 24, size: tuple[int, int] = (40, 36)) -> Path:
    """``n`` JPEGs of ``size`` (w, h) dealt into two class folders."""
    for k in range(n):
        p = root / "ab"[k % 2] / f"{k:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(k)
        arr = (torch.rand((4, 4, 3), generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).resize(size, Image.BICUBIC).save(p, quality=90)
    return root


# ---------------------------------------------------------------- the path taken
def test_cpu_path_gives_the_per_sample_dataloaders_batches():
    t = _data()
    assert isinstance(t.loader, DeviceBatches) and isinstance(t.loader, BatchLoader)
    assert isinstance(t.sampler, ResumableSampler) and t.sampler.seed == 7
    assert not t.gpu_resident and t.description == "0 workers" and t.batches_per_epoch == 4
    # the same samples, seeds and transform as a hand-built per-sample pipeline
    tf = pretrain_transform(32, MEAN, STD, 0.2, True, normalize=False)
    sampler = ResumableSampler(64, seed=7)
    reference = build_loader(SyntheticShapes(64, 32, 3, 10, 7, tf), 16, sampler, 0)
    for s in (t.sampler, sampler):
        s.set_epoch(2, start=16)
    batches = list(t.loader)
    assert len(t.loader) == len(batches) == 3
    for (x, y), (u, v) in zip(batches, reference, strict=True):
        assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
        assert torch.equal(x, normalize_uint8(u, MEAN, STD)) and torch.equal(y, v)


def test_rank_gets_its_share_of_the_epoch():
    t = _data(rank=1, world_size=2)
    assert (t.sampler.rank, t.sampler.world_size) == (1, 2)
    assert t.batches_per_epoch == 2 and len(t.loader) == 2


def test_gpu_resident_on_decodes_the_set_once():
    t = _data(gpu_resident="on")
    assert t.gpu_resident and t.description == "GPU-resident" and t.batches_per_epoch == 4
    assert isinstance(t.loader, GPUBatchLoader) and isinstance(t.loader, BatchLoader)
    assert t.loader.images.dtype == torch.uint8 and t.loader.images.shape == (64, 3, 32, 32)
    assert t.loader.sampler is t.sampler and t.loader.seed == 7
    t.sampler.set_epoch(0)
    imgs, labels = next(iter(t.loader))
    assert imgs.shape == (16, 3, 32, 32) and imgs.dtype == torch.float32 and labels.shape == (16,)


def test_auto_on_a_fake_cuda_device_is_decided_before_decoding(monkeypatch):
    free = [1 << 30]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 4 * free[0]))

    def plan(**kw):
        cfg = DataConfig(**{"num_samples": 64, "num_workers": 0, **kw})
        return plan_training_set(cfg, img_size=32, in_chans=3, mean=MEAN, std=STD, seed=7, device=torch.device("cuda"))

    ds, transform, store = plan()
    assert store == (32, 32) and isinstance(transform.transform, Uint8Image)
    img, _ = ds[0]  # stored as decoded, no augmentation
    assert img.dtype == torch.uint8 and torch.equal(img, ds.raw(0)[0])
    free[0] = 1 << 10  # 1 KiB free: the CPU path's random crops, uint8
    ds, transform, store = plan()
    assert store is None and not isinstance(transform.transform, Uint8Image)
    assert ds[0][0].dtype == torch.uint8 and ds[0][0].shape == (3, 32, 32)
    assert plan(gpu_resident="off").store is None


def test_decode_gpu_uses_the_jpeg_loader(tmp_path):
    t = _data(batch_size=8, name=str(_folder(tmp_path / "data")), decode="gpu")
    assert isinstance(t.loader, JPEGDecodeLoader) and isinstance(t.loader, BatchLoader)
    assert not t.gpu_resident and t.batches_per_epoch == 3
    assert t.description == "0 workers read files, JPEGs decoded on cpu"


def test_shards_are_their_own_sampler(tmp_path):
    pytest.importorskip("webdataset")
    from maelab.data.shards import ShardStream, write_shards

    write_shards(_folder(tmp_path / "data"), tmp_path / "shards", 5)
    t = _data(batch_size=8, name=str(tmp_path / "shards"))
    assert isinstance(t.dataset, ShardStream) and t.sampler is t.dataset
    assert isinstance(t.loader, DeviceBatches) and not t.gpu_resident and t.batches_per_epoch == 3
    t.sampler.set_epoch(0, start=8)
    batches = list(t.loader)
    assert len(batches) == 2 and batches[0][0].shape == (8, 3, 32, 32)
    # fixed images of a stream: the first images of its first shard, evaluation transform
    imgs = t.fixed_images(4, 32, MEAN, STD, 1.0)
    assert torch.equal(imgs, torch.stack(t.dataset.head(4, eval_transform(32, MEAN, STD, 1.0))))
    with pytest.raises(ConfigError, match="need an image folder or a built-in dataset"):
        _data(batch_size=8, name=str(tmp_path / "shards"), gpu_resident="on")


def test_fewer_images_than_one_global_batch():
    assert _data(batch_size=16, world_size=2, num_samples=32).batches_per_epoch == 1
    with pytest.raises(DataError, match=r"has 31 images, fewer than one global batch \(batch_size=16 x 2 processes"):
        _data(batch_size=16, world_size=2, num_samples=31)


# ---------------------------------------------------------------- data.augment
OTHER_AUGMENTATIONS = ["none", "fixed_crop", "random_crop+color_jitter"]


@pytest.mark.parametrize("augment", OTHER_AUGMENTATIONS)
def test_augment_sets_the_cpu_paths_transform(augment):
    t = _data(augment=augment)
    assert isinstance(t.loader, DeviceBatches) and not t.gpu_resident
    assert t.description == f"0 workers, data.augment={augment}"
    tf = pretrain_transform(32, MEAN, STD, 0.2, True, normalize=False, augment=augment)
    sampler = ResumableSampler(64, seed=7)
    reference = build_loader(SyntheticShapes(64, 32, 3, 10, 7, tf), 16, sampler, 0)
    default = _data()
    for s in (t.sampler, sampler, default.sampler):
        s.set_epoch(1)
    (x, y), (u, v), (d, _) = next(iter(t.loader)), next(iter(reference)), next(iter(default.loader))
    assert torch.equal(x, normalize_uint8(u, MEAN, STD)) and torch.equal(y, v)
    assert not torch.equal(x, d)  # not the default's random resized crops


def test_augment_none_trains_on_the_evaluation_views():
    t = _data(augment="none", crop_pct=0.8)  # data.crop_pct: resize 32 -> 40 px, center 32 px
    views = _views(64, 0.8)
    trained = normalize_uint8(torch.stack([t.dataset[i][0] for i in range(8)]), MEAN, STD)
    assert torch.equal(trained, torch.stack([views[i][0] for i in range(8)]))


@pytest.mark.parametrize("augment", OTHER_AUGMENTATIONS)
def test_other_augmentations_refuse_the_gpu_paths(tmp_path, augment):
    """GPU-resident and decode=gpu batches are augmented as random_crop only: asking for them is one line."""
    with pytest.raises(ConfigError) as err:
        _data(augment=augment, gpu_resident="on")
    assert str(err.value) == (
        f"data.augment={augment} needs the CPU path: data.gpu_resident=on augments as random_crop only; "
        "use gpu_resident=auto or off and decode=cpu"
    )
    with pytest.raises(ConfigError) as err:
        _data(batch_size=8, name=str(_folder(tmp_path / "data")), decode="gpu", augment=augment)
    assert str(err.value).startswith(f"data.augment={augment} needs the CPU path: data.decode=gpu augments")


def test_other_augmentations_turn_auto_gpu_resident_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 1 << 32))

    def plan(**kw):
        cfg = DataConfig(**{"num_samples": 64, "num_workers": 0, **kw})
        return plan_training_set(cfg, img_size=32, in_chans=3, mean=MEAN, std=STD, seed=7, device=torch.device("cuda"))

    assert plan().store == (32, 32)  # the default would be GPU-resident here
    for augment in OTHER_AUGMENTATIONS:
        ds, transform, store = plan(augment=augment)
        assert store is None and not isinstance(transform.transform, Uint8Image)
        assert ds[0][0].dtype == torch.uint8 and ds[0][0].shape == (3, 32, 32)


def test_color_jitter_needs_one_or_three_channels():
    cfg = DataConfig(num_samples=64, num_workers=0, augment="random_crop+color_jitter")
    with pytest.raises(ConfigError, match=r"^data.augment=random_crop\+color_jitter needs 1 or 3 channels, not in_"):
        plan_training_set(cfg, img_size=32, in_chans=2, mean=(0.5,) * 2, std=(0.5,) * 2, seed=7, device=CPU)


# ---------------------------------------------------------------- fixed images for figures
@pytest.mark.parametrize("resident", ["off", "on"])
def test_fixed_images_are_evenly_spaced_evaluation_views(resident):
    t = _data(gpu_resident=resident)
    training = t.transform.transform
    fixed = t.fixed_images(8, 32, MEAN, STD, 1.0)
    assert fixed.shape == (8, 3, 32, 32) and fixed.dtype == torch.float32
    assert torch.equal(fixed, t.fixed_images(8, 32, MEAN, STD, 1.0))  # no augmentation
    assert t.transform.transform is training  # the training transform is back
    views = _views(64)
    assert torch.equal(fixed, torch.stack([views[i * 8][0] for i in range(8)]))  # indices 0, 8, ..., 56
    # the training views of the same images differ: random crops and flips
    idx = torch.arange(0, 64, 8)
    if isinstance(t.loader, GPUBatchLoader):
        augmented = t.loader.augment(idx, 0, 0)
    else:
        augmented = normalize_uint8(torch.stack([t.dataset[i][0] for i in idx.tolist()]), MEAN, STD)
    assert augmented.shape == fixed.shape and not torch.allclose(augmented, fixed)


def test_fixed_images_of_a_small_set_are_all_of_it():
    t = _data(batch_size=4, num_samples=5)
    fixed = t.fixed_images(8, 32, MEAN, STD, 1.0)
    views = _views(5)
    assert torch.equal(fixed, torch.stack([views[i][0] for i in range(5)]))
