"""uint8 batches normalized on the device give the float CPU pipeline's values exactly."""

from __future__ import annotations

import pytest
import torch

from maelab.data.loader import ResumableSampler, build_loader
from maelab.data.prefetch import DeviceBatches, normalize_uint8
from maelab.data.synthetic import SyntheticShapes
from maelab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform
from torchvision.transforms import v2


@pytest.mark.parametrize(("channels", "mean", "std"), [(3, IMAGENET_MEAN, IMAGENET_STD), (1, (0.5,), (0.25,))])
def test_normalize_uint8_equals_per_sample_transform(channels, mean, std):
    images = torch.randint(0, 256, (5, channels, 7, 9), dtype=torch.uint8)
    per_sample = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    expected = torch.stack([per_sample(img) for img in images])
    assert torch.equal(normalize_uint8(images, mean, std), expected)


def _batches(normalize: bool, workers: int, device: str = "cpu"):
    ds = SyntheticShapes(num_samples=24, img_size=32, channels=3, seed=0,
                         transform=pretrain_transform(24, IMAGENET_MEAN, IMAGENET_STD, 0.2, True, normalize=normalize))
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
    ds = SyntheticShapes(num_samples=16, img_size=8, channels=3, seed=0,
                         transform=pretrain_transform(8, IMAGENET_MEAN, IMAGENET_STD, normalize=False))
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
