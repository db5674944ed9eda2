"""SyntheticShapes: deterministic, any channel count, and learnable."""

from __future__ import annotations

import pytest
import torch

from maelab.data import SyntheticShapes, default_stats, pretrain_transform
from maelab.data.synthetic import SHAPE_NAMES, class_names


def test_item_types_and_range():
    ds = SyntheticShapes(num_samples=8, img_size=(16, 24), channels=3)
    x, y = ds[3]
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert isinstance(y, int) and y == 3
    assert len(ds) == 8 and ds.labeled and len(ds.classes) == 10
    raw, _ = ds.raw(3)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 24)
    with pytest.raises(IndexError):
        ds[8]


def test_deterministic_by_seed_and_index():
    a = SyntheticShapes(16, 32, seed=7)
    b = SyntheticShapes(16, 32, seed=7)
    c = SyntheticShapes(16, 32, seed=8)
    assert torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], a[6][0])
    assert not torch.equal(a[5][0], c[5][0])
    assert torch.equal(a[-1][0], a[15][0])


@pytest.mark.parametrize("channels", [1, 5])
def test_channels_with_transform(channels):
    mean, std = default_stats(channels)
    ds = SyntheticShapes(4, 32, channels=channels, transform=pretrain_transform(16, mean, std))
    x, _ = ds[0]
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32


def test_many_classes_and_names():
    assert len(SHAPE_NAMES) >= 20
    names = class_names(45)
    assert len(set(names)) == 45 and names[20] == "disk x2" and names[40] == "disk x3"
    ds = SyntheticShapes(45, 24, num_classes=45)
    assert ds[44][1] == 44 and ds[44][0].shape == (3, 24, 24)


def test_foreground_contrasts_with_background():
    ds = SyntheticShapes(20, 32)
    for i in range(20):
        x = ds[i][0].mean(0)
        assert float(x.max() - x.min()) > 0.3


def _invariant_features(x: torch.Tensor) -> torch.Tensor:
    """Translation/rotation-robust features [N, 12] of images x [N, C, H, W]."""
    g = x.mean(1)
    m = (g - g.flatten(1).median(1).values[:, None, None]).abs()
    m = m / (m.flatten(1).amax(1)[:, None, None] + 1e-6)
    spec = torch.fft.fft2(m).abs()
    f = torch.fft.fftfreq(m.shape[-1])
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    bins = (r / r.max() * 8).long().clamp(max=7).flatten()
    prof = torch.zeros(len(x), 8).index_add_(1, bins, spec.flatten(1)) / torch.bincount(bins)
    prof = prof[:, 1:] / prof[:, :1]
    fills = [(m > t).float().flatten(1).mean(1) for t in (0.2, 0.4, 0.6, 0.8)]
    return torch.cat([prof, m.flatten(1).mean(1, keepdim=True), torch.stack(fills, 1)], 1)


def test_classes_are_learnable_knn():
    nc = 10
    train = SyntheticShapes(400, 32, num_classes=nc, seed=0)
    test = SyntheticShapes(200, 32, num_classes=nc, seed=1)
    xtr = torch.stack([train[i][0] for i in range(len(train))])
    xte = torch.stack([test[i][0] for i in range(len(test))])
    ytr = torch.arange(len(train)) % nc
    yte = torch.arange(len(test)) % nc
    a, b = _invariant_features(xtr), _invariant_features(xte)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    nearest = ytr[torch.cdist(b, a).topk(5, largest=False).indices]
    acc = (nearest.mode(1).values == yte).float().mean().item()
    assert acc > 0.5, acc  # chance is 0.1


def test_bad_arguments():
    with pytest.raises(ValueError):
        SyntheticShapes(num_classes=1)
