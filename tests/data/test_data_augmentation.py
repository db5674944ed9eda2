"""What the augmentations do to images, measured on the output: crop areas reach ``min_scale``
(the paper's 0.2, not Inception's 0.08), flips happen at the requested rate, the resize is
bicubic, and evaluation crops are centred. For the CPU transform and the GPU-resident crop."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maelab.data import eval_transform, pretrain_transform
from maelab.data.loader import ResumableSampler
from maelab.data.loaders import GPUBatchLoader

SIDE = 128
ZERO1 = ((0.0, 0.0), (1.0, 1.0))  # mean, std that leave x / 255


def ramp(side: int = SIDE) -> torch.Tensor:
    """uint8 [2, side, side]: channel 0 is 2 * x, channel 1 is 2 * y (pixel coordinates, doubled)."""
    coords = torch.arange(side, dtype=torch.uint8) * 2
    return torch.stack([coords.view(1, side).expand(side, side), coords.view(side, 1).expand(side, side)])


def crop_geometry(out: torch.Tensor, side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Area fraction [B] and horizontal flip [B] of crops of :func:`ramp` images, from outputs
    [B, 2, h, w] normalized by ``ZERO1``: the ramps' slopes over the interior (away from the
    resampling's edge effects) give the crop's width and height in input pixels."""
    coord = out.double() * 255 / 2  # input pixel coordinates
    h, w = out.shape[-2:]
    slope_x = (coord[:, 0, :, -3] - coord[:, 0, :, 2]).mean(1) / (w - 5)
    slope_y = (coord[:, 1, -3, :] - coord[:, 1, 2, :]).mean(1) / (h - 5)
    return (slope_x.abs() * w) * (slope_y * h) / side**2, slope_x < 0


def cpu_crops(n: int = 400, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``crop_geometry`` of ``n`` draws of ``pretrain_transform(32, ..., **kw)``, seeds 0..n-1."""
    t = pretrain_transform(32, *ZERO1, **kw)
    img, outs = ramp(), []
    for s in range(n):
        torch.manual_seed(s)
        outs.append(t(img))
    return crop_geometry(torch.stack(outs))


def test_cpu_crop_area_reaches_the_default_min_scale_and_flips_half():
    area, flipped = cpu_crops()  # defaults: min_scale 0.2, hflip on
    assert 0.17 < area.min() < 0.25 and area.max() > 0.9, (area.min(), area.max())  # 0.08 would go below 0.15
    assert 0.42 < flipped.double().mean() < 0.58


def test_cpu_min_scale_and_hflip_reach_the_crop():
    area, flipped = cpu_crops(200, min_scale=0.5, hflip=False)
    assert 0.47 < area.min() < 0.56, area.min()
    assert not flipped.any()


def test_cpu_resize_is_bicubic():
    """A full-image crop (square image, min_scale 1) is torchvision's antialiased bicubic resize, not bilinear."""
    img = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = pretrain_transform(32, (0.0,) * 3, (1.0,) * 3, min_scale=1.0, hflip=False, normalize=False)(img)
    bicubic = TF.resize(img, [32, 32], interpolation=InterpolationMode.BICUBIC, antialias=True)
    bilinear = TF.resize(img, [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(out, bicubic)
    assert (bicubic.float() - bilinear.float()).abs().mean() > 3  # uint8 levels: the two are easy to tell apart


def test_eval_crop_is_centred():
    """A block at the exact centre of a 64 x 50 image stays at the centre of the 32 x 32 crop (a
    corner crop would move it by 7 px)."""
    img = torch.zeros(1, 50, 64, dtype=torch.uint8)
    img[:, 21:29, 28:36] = 255  # rows 21..28, columns 28..35: centred at (24.5, 31.5)
    out = eval_transform(32, (0.0,), (1.0,), crop_pct=0.875)(img)[0].double()
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centroid = torch.stack([(out * rows.double()).sum(), (out * cols.double()).sum()]) / out.sum()
    torch.testing.assert_close(centroid, torch.tensor([15.5, 15.5], dtype=torch.float64), atol=0.05, rtol=0)


def test_gpu_crop_area_reaches_the_default_min_scale_and_flips_half():
    n = 256
    images = ramp().expand(n, 2, SIDE, SIDE).contiguous()
    sampler = ResumableSampler(n, seed=0)
    loader = GPUBatchLoader(images, torch.zeros(n), 64, sampler, 32, *ZERO1, seed=0)  # defaults: 0.2, hflip on
    sampler.set_epoch(0)
    area, flipped = crop_geometry(torch.cat([x for x, _ in loader]))
    assert 0.17 < area.min() < 0.25 and area.max() > 0.9, (area.min(), area.max())
    assert 0.4 < flipped.double().mean() < 0.6
