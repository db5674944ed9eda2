"""uint8 batches normalized on the device give the float CPU pipeline's values exactly."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from maelab.data.loader import ResumableSampler, build_loader
from maelab.data.prefetch import DeviceBatches, normalize_uint8, stats_tensors
from maelab.data.synthetic import SyntheticShapes
from maelab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform


@pytest.mark.parametrize(("channels", "mean", "std"), [(3, IMAGENET_MEAN, IMAGENET_STD), (1, (0.5,), (0.25,))])
def test_normalize_uint8_equals_per_sample_transform(channels, mean, std):
    images = torch.randint(0, 256, (5, channels, 7, 9), dtype=torch.uint8)
    per_sample = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    expected = torch.stack([per_sample(img) for img in images])
    assert torch.equal(normalize_uint8(images, mean, std), expected)


def _batches(normalize: bool, workers: int, device: str = "cpu"):
    ds = SyntheticShapes(
        num_samples=24,
        img_size=32,
        channels=3,
        seed=0,
        transform=pretrain_transform(24, IMAGENET_MEAN, IMAGENET_STD, 0.2, True, normalize=normalize),
    )
    sampler = ResumableSampler(len(ds), seed=3)
    sampler.set_epoch(1)
    loader = build_loader(ds, 8, sampler, workers)
    return list(DeviceBatches(loader, device, IMAGENET_MEAN, IMAGENET_STD) if not normalize else loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_batches_match_the_float_pipeline(workers):
    ours, reference = _batches(False, workers), _batches(True, workers)
    assert len(ours) == len(reference) == 3
    for (a, la), (b, lb) in zip(ours, reference):
        assert a.dtype == torch.float32 and a.shape == (8, 3, 24, 24)
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_device_batches_passes_loader_attributes():
    ds = SyntheticShapes(
        num_samples=16,
        img_size=8,
        channels=3,
        seed=0,
        transform=pretrain_transform(8, IMAGENET_MEAN, IMAGENET_STD, normalize=False),
    )
    loader = build_loader(ds, 4, ResumableSampler(16), 0)
    wrapped = DeviceBatches(loader, "cpu", IMAGENET_MEAN, IMAGENET_STD)
    assert len(wrapped) == 4 and wrapped.batch_size == 4 and wrapped.sampler is loader.sampler
    assert "cpu" in repr(wrapped)


@pytest.mark.gpu
def test_cuda_prefetch_equals_cpu_values():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ours = _batches(False, 2, "cuda")
    reference = _batches(True, 2)
    for (a, _), (b, _) in zip(ours, reference):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6)


def test_stats_tensors_give_the_list_values_bit_for_bit():
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    mean, std = stats_tensors(IMAGENET_MEAN, IMAGENET_STD, "cpu")
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (3,)
    assert torch.equal(normalize_uint8(images, mean, std), normalize_uint8(images, IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match="std evaluated to zero"):
        stats_tensors((0.5,), (0.0,), "cpu")


def test_device_batches_build_mean_std_once_not_per_batch(monkeypatch):
    """From lists, torchvision's normalize copies mean and std to the device at every call: on CUDA a
    blocking copy, i.e. the host waiting for the previous training step at every batch."""
    from maelab.data import prefetch

    made = []

    def counting(*args):
        made.append(args)
        return stats_tensors(*args)

    monkeypatch.setattr(prefetch, "stats_tensors", counting)
    ds = SyntheticShapes(
        num_samples=16,
        img_size=8,
        channels=3,
        seed=0,
        transform=pretrain_transform(8, IMAGENET_MEAN, IMAGENET_STD, normalize=False),
    )
    wrapped = DeviceBatches(build_loader(ds, 4, ResumableSampler(16), 0), "cpu", IMAGENET_MEAN, IMAGENET_STD)
    for _ in range(2):  # two epochs of 4 batches
        assert len(list(wrapped)) == 4
    assert len(made) == 1


@pytest.mark.gpu
def test_cuda_prefetch_does_not_synchronize_per_batch():
    """After the first batch, iterating DeviceBatches on CUDA makes no host-device synchronization."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batches = [
        (torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8).pin_memory(), torch.arange(8)) for _ in range(4)
    ]
    wrapped = DeviceBatches(batches, "cuda", IMAGENET_MEAN, IMAGENET_STD)
    expected = [normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD) for x, _ in batches]
    list(wrapped)  # makes mean/std on the device (one blocking copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [x for x, _ in wrapped]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(out, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6)


def test_device_batches_check_mean_std():
    with pytest.raises(ValueError, match="mean/std need as many values, got 3 and 1"):
        DeviceBatches([], "cpu", IMAGENET_MEAN, (0.5,))
