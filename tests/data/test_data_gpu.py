"""GPU-resident data path (maelab.data.gpu_crop, .loaders, .resident), tested on CPU: crop parameters against
torchvision's RandomResizedCrop, resampling against torchvision's resized_crop, and the
batch loader's coverage, determinism and exact mid-epoch resume."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maelab.data import pretrain_transform
from maelab.data.gpu_crop import batched_resized_crop, random_resized_crop_params
from maelab.data.loader import ResumableSampler
from maelab.data.loaders import GPUBatchLoader
from maelab.data.resident import Uint8Image, fits_in_memory, load_uint8_tensor, plan_gpu_resident
from maelab.data.synthetic import SyntheticShapes

BICUBIC = InterpolationMode.BICUBIC
ZERO1 = ((0.0,), (1.0,))  # mean, std that leave x / 255


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max |ECDF_a - ECDF_b|."""
    a, b = a.double().sort().values, b.double().sort().values
    pts = torch.cat([a, b])
    fa = torch.searchsorted(a, pts, right=True).double() / len(a)
    fb = torch.searchsorted(b, pts, right=True).double() / len(b)
    return (fa - fb).abs().max().item()


def _torchvision_boxes(n: int, height: int, width: int, scale, ratio, seed: int = 0) -> torch.Tensor:
    """``n`` boxes from torchvision v2's RandomResizedCrop (what pretrain_transform uses)."""
    t = v2.RandomResizedCrop(8, scale=scale, ratio=ratio)
    make = getattr(t, "make_params", None) or t._get_params
    img = [tv_tensors.Image(torch.zeros(1, height, width, dtype=torch.uint8))]
    torch.manual_seed(seed)
    rows = []
    for _ in range(n):
        p = make(img)
        rows.append((p["top"], p["left"], p["height"], p["width"]))
    return torch.tensor(rows, dtype=torch.int64)


def _stats(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(1)
    return {"area": h * w / (height * width), "log_aspect": torch.log(w / h), "top": top, "left": left}


# ---------------------------------------------------------------------------- crop parameters
@pytest.mark.parametrize("height,width", [(32, 32), (20, 50)])
def test_boxes_inside_image_with_valid_area_and_aspect(height, width):
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    g = torch.Generator().manual_seed(1)
    boxes = random_resized_crop_params(20000, height, width, scale, ratio, generator=g)
    assert boxes.shape == (20000, 4) and boxes.dtype == torch.int64
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # accepted boxes: a real (w', h') within rounding (+-0.5) has the drawn area and aspect
    hw = float(height * width)
    hf, wf = h.double(), w.double()
    fallback = (h == height) & (w == width) if height == width else torch.zeros_like(h, dtype=torch.bool)
    acc = ~fallback
    assert ((wf + 0.5) * (hf + 0.5) >= scale[0] * hw)[acc].all()
    assert ((wf - 0.5) * (hf - 0.5) <= scale[1] * hw)[acc].all()
    assert ((wf + 0.5) / (hf - 0.5) >= ratio[0])[acc].all()
    assert ((wf - 0.5) / (hf + 0.5) <= ratio[1])[acc].all()


@pytest.mark.parametrize(
    "height,width,scale,ratio",
    [
        (32, 32, (0.2, 1.0), (3 / 4, 4 / 3)),  # MAE's setting
        (20, 50, (0.08, 1.0), (3 / 4, 4 / 3)),  # non-square: many rejected attempts
        (32, 32, (0.08, 1.0), (2.0, 4.0)),  # ~4% of samples fall back to the center crop
    ],
)
def test_box_distribution_matches_torchvision(height, width, scale, ratio):
    ours = random_resized_crop_params(20000, height, width, scale, ratio, generator=torch.Generator().manual_seed(2))
    ref = _torchvision_boxes(4000, height, width, scale, ratio, seed=3)
    s_ours, s_ref = _stats(ours, height, width), _stats(ref, height, width)
    # KS critical value at alpha = 0.001 for n=4000, m=20000 is 1.95 * sqrt(1/4000 + 1/20000) = 0.034
    for key in s_ours:
        assert _ks(s_ours[key], s_ref[key]) < 0.034, key
    for key in ("area", "log_aspect"):
        assert abs(s_ours[key].mean() - s_ref[key].mean()) < 0.02, key
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        assert (torch.quantile(s_ours[key], q) - torch.quantile(s_ref[key], q)).abs().max() < 0.05, key
    if ratio == (2.0, 4.0):  # the same share of center-crop fallbacks (w=32, h=round(32/2), top=8)
        fb = torch.tensor([8, 0, 16, 32])
        frac_ours = (ours == fb).all(1).double().mean().item()
        frac_ref = (ref == fb).all(1).double().mean().item()
        assert 0.02 < frac_ours < 0.07  # the fallback path really ran
        assert abs(frac_ours - frac_ref) < 0.015


@pytest.mark.parametrize(
    "height,width,scale,ratio,expected",
    [
        (32, 32, (0.2, 1.0), (10.0, 20.0), (14, 0, 3, 32)),  # image narrower than the ratios: full width
        (10, 50, (0.9, 1.0), (0.5, 1.0), (0, 20, 10, 10)),  # image wider than the ratios: full height
    ],
)
def test_fallback_is_torchvision_center_crop(height, width, scale, ratio, expected):
    boxes = random_resized_crop_params(500, height, width, scale, ratio, generator=torch.Generator().manual_seed(0))
    assert (boxes == torch.tensor(expected)).all()
    ref = _torchvision_boxes(20, height, width, scale, ratio)
    assert (ref == torch.tensor(expected)).all()


def test_params_are_a_function_of_the_generator_state():
    a = random_resized_crop_params(64, 32, 32, generator=torch.Generator().manual_seed(5))
    b = random_resized_crop_params(64, 32, 32, generator=torch.Generator().manual_seed(5))
    c = random_resized_crop_params(64, 32, 32, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------- crop + resize
@pytest.mark.parametrize("antialias", [False, True])
def test_full_box_same_size_is_identity_and_flip_mirrors(antialias):
    imgs = _images(4, 3, 16, 20)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    full = torch.tensor([[0, 0, 16, 20]] * 4)
    expect = (imgs.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = batched_resized_crop(imgs, full, (16, 20), None, mean, std, antialias=antialias)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 20)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
    flip = torch.tensor([True, False, True, False])
    out = batched_resized_crop(imgs, full, (16, 20), flip, mean, std, antialias=antialias)
    torch.testing.assert_close(out[flip], expect[flip].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~flip], expect[~flip], atol=1e-5, rtol=0)


def _random_boxes(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    return random_resized_crop_params(
        n, height, width, (0.1, 1.0), (0.5, 2.0), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("out_size", [(40, 40), (12, 20), (24, 30)])
def test_antialias_matches_torchvision_resized_crop(out_size):
    """antialias=True: torchvision's antialiased bicubic resized_crop, to float rounding."""
    imgs = _images(12, 3, 24, 30, seed=1).float()
    boxes = _random_boxes(12, 24, 30, seed=2)
    flip = torch.arange(12) % 3 == 0
    out = batched_resized_crop(imgs, boxes, out_size, flip, *ZERO1, antialias=True)
    ref = torch.stack(
        [
            TF.resized_crop(imgs[i], *boxes[i].tolist(), list(out_size), interpolation=BICUBIC, antialias=True)
            for i in range(12)
        ]
    )
    ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref).clamp(0, 255) / 255
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _keys_matrix(start: int, length: int, in_size: int, out_size: int, a: float = -0.75) -> torch.Tensor:
    """Reference [out, in] weights: bicubic sampling at torchvision's positions, replicate at the image edge."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = start + (i + 0.5) * length / out_size - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            t = abs(src - k)
            wt = (
                ((a + 2) * t - (a + 3)) * t * t + 1
                if t < 1
                else (((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0)
            )
            m[i, min(max(k, 0), in_size - 1)] += wt
    return m


def _tap_inside(length: int, out_size: int) -> torch.Tensor:
    """Output pixels whose 4 bicubic taps all lie inside the crop."""
    src = (torch.arange(out_size, dtype=torch.float64) + 0.5) * length / out_size - 0.5
    base = torch.floor(src)
    return (base - 1 >= 0) & (base + 2 <= length - 1)


@pytest.mark.parametrize("out_size", [(40, 40), (12, 20), (24, 30)])
def test_grid_sample_path_vs_torchvision_resized_crop(out_size):
    """antialias=False: bicubic (a=-0.75) at torchvision's sampling positions.

    Exact (to float rounding) against a reference that reads the whole image with edge
    replication; equal to torchvision's resized_crop wherever the 4x4 taps stay inside the
    crop. Near the crop's edges torchvision replicates the crop border while grid_sample
    reads the real neighbouring pixels, so values there differ (by design).
    """
    n, height, width = 12, 24, 30
    imgs = _images(n, 3, height, width, seed=3).float()
    boxes = _random_boxes(n, height, width, seed=4)
    out = batched_resized_crop(imgs, boxes, out_size, None, *ZERO1, antialias=False)
    oh, ow = out_size
    interior_checked = 0
    for i in range(n):
        top, left, h, w = boxes[i].tolist()
        my, mx = _keys_matrix(top, h, height, oh), _keys_matrix(left, w, width, ow)
        ref = (my @ imgs[i].double() @ mx.T).clamp(0, 255) / 255
        torch.testing.assert_close(out[i].double(), ref, atol=2e-5, rtol=0)
        tv = (
            TF.resized_crop(imgs[i], top, left, h, w, list(out_size), interpolation=BICUBIC, antialias=False).clamp(
                0, 255
            )
            / 255
        )
        inside = _tap_inside(h, oh)[:, None] & _tap_inside(w, ow)[None, :]
        interior_checked += int(inside.sum())
        torch.testing.assert_close(out[i][:, inside], tv[:, inside], atol=2e-5, rtol=0)
    assert interior_checked > 0
    # whole-image boxes: no crop edge inside the image, so torchvision agrees everywhere
    full = torch.tensor([[0, 0, height, width]] * n)
    out = batched_resized_crop(imgs, full, out_size, None, *ZERO1, antialias=False)
    tv = TF.resize(imgs, list(out_size), interpolation=BICUBIC, antialias=False).clamp(0, 255) / 255
    torch.testing.assert_close(out, tv, atol=2e-5, rtol=0)


def test_uint8_and_float_inputs_agree_and_cpu_transform_is_close():
    imgs = torch.stack([SyntheticShapes(16, 32, 3).raw(i)[0] for i in range(16)])
    boxes = random_resized_crop_params(16, 32, 32, generator=torch.Generator().manual_seed(0))
    out = batched_resized_crop(imgs, boxes, 32, None, *ZERO1, antialias=True)
    torch.testing.assert_close(out, batched_resized_crop(imgs.float(), boxes, 32, None, *ZERO1, antialias=True))
    # the CPU pretrain_transform resizes uint8 with torchvision's integer kernel: same weights,
    # but it rounds (and clips overshoot) after each pass; on average < 1 uint8 level apart
    cpu = (
        torch.stack(
            [
                TF.resized_crop(imgs[i], *boxes[i].tolist(), [32, 32], interpolation=BICUBIC, antialias=True)
                for i in range(16)
            ]
        ).float()
        / 255
    )
    diff = (out - cpu).abs() * 255
    assert diff.mean() < 0.6 and (diff > 1.0).float().mean() < 0.02


# ---------------------------------------------------------------------------- loader
def _loader(n=64, bs=8, seed=0, size=12, rank=0, world=1, **kw) -> GPUBatchLoader:
    imgs = _images(n, 3, size, size, seed=7)
    sampler = ResumableSampler(n, seed=seed, rank=rank, world_size=world)
    return GPUBatchLoader(
        imgs, torch.arange(n), bs, sampler, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=seed, **kw
    )


def _epoch(loader: GPUBatchLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch, start=start)
    return list(loader)


def test_loader_covers_each_index_once_and_reshuffles():
    loader = _loader()
    assert len(loader) == 8
    e0, e1 = _epoch(loader, 0), _epoch(loader, 1)
    for batches in (e0, e1):
        assert len(batches) == 8
        imgs, labels = batches[0]
        assert imgs.shape == (8, 3, 12, 12) and imgs.dtype == torch.float32 and labels.shape == (8,)
        assert torch.equal(torch.cat([lab for _, lab in batches]).sort().values, torch.arange(64))
    assert not torch.equal(torch.cat([lab for _, lab in e0]), torch.cat([lab for _, lab in e1]))


def test_loader_drops_last_and_splits_ranks():
    assert len(_epoch(_loader(n=70), 0)) == 8  # 70 // 8
    r0 = torch.cat([lab for _, lab in _epoch(_loader(rank=0, world=2), 0)])
    r1 = torch.cat([lab for _, lab in _epoch(_loader(rank=1, world=2), 0)])
    assert len(r0) == len(r1) == 32
    assert torch.equal(torch.cat([r0, r1]).sort().values, torch.arange(64))
    # ranks draw different augmentations for the same batch position
    assert _loader(rank=0, world=2).batch_seed(0, 0) != _loader(rank=1, world=2).batch_seed(0, 0)


def test_loader_is_deterministic_given_seed():
    a, b = _epoch(_loader(), 2), _epoch(_loader(), 2)
    c = _epoch(_loader(seed=1), 2)
    for (xa, la), (xb, lb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(la, lb)
    assert not torch.equal(a[0][0], c[0][0])


def test_resume_mid_epoch_reproduces_the_remaining_batches():
    full = _epoch(_loader(), 3)
    loader = _loader()
    loader.sampler.set_epoch(3, start=3 * 8)
    assert len(loader) == 5
    rest = list(loader)
    assert len(rest) == 5
    for (xa, la), (xb, lb) in zip(full[3:], rest):
        assert torch.equal(la, lb)
        assert torch.equal(xa, xb)  # bit for bit


def test_flip_happens_about_half_the_time():
    # square image, min_scale=1: every accepted (w, h) rounds to the full 6 x 6 image
    ramp = torch.arange(6, dtype=torch.uint8).mul(40).view(1, 1, 1, 6).expand(512, 1, 6, 6).contiguous()
    sampler = ResumableSampler(512, seed=0)

    def flipped_fraction(hflip: bool) -> float:
        loader = GPUBatchLoader(
            ramp, torch.zeros(512), 64, sampler, 6, (0.0,), (1.0,), min_scale=1.0, hflip=hflip, seed=0
        )
        sampler.set_epoch(0)
        imgs = torch.cat([x for x, _ in loader])
        plain = ramp[:1].float() / 255
        is_plain = (imgs - plain).abs().amax((1, 2, 3)) < 1e-5
        is_flip = (imgs - plain.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
        assert (is_plain ^ is_flip).all()
        return is_flip.double().mean().item()

    assert 0.42 < flipped_fraction(True) < 0.58
    assert flipped_fraction(False) == 0.0


def test_loader_rejects_mismatches():
    imgs = _images(16, 3, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        GPUBatchLoader(imgs.float(), torch.arange(16), 4, ResumableSampler(16), 8, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="sampler"):
        GPUBatchLoader(imgs, torch.arange(16), 4, ResumableSampler(15), 8, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="mean/std"):
        GPUBatchLoader(imgs, torch.arange(16), 4, ResumableSampler(16), 8, (0.5,), (0.5,))


# ---------------------------------------------------------------------------- decoding once
class _PILSet(Dataset):
    """PIL images of different sizes (like an image folder)."""

    def __init__(self, transform) -> None:
        self.transform = transform
        self.sizes = [(40, 30), (30, 40), (16, 16), (50, 20), (17, 23)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i):
        w, h = self.sizes[i]
        return self.transform(Image.new("RGB", (w, h), (i * 40, 100, 200))), i


def test_load_uint8_tensor_synthetic_native_size():
    ds = SyntheticShapes(10, (12, 16), 3, transform=Uint8Image())
    images, labels = load_uint8_tensor(ds, batch_size=4, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 12, 16)
    assert labels.dtype == torch.int64 and labels.tolist() == [ds.raw(i)[1] for i in range(10)]
    assert torch.equal(images, torch.stack([ds.raw(i)[0] for i in range(10)]))


def test_load_uint8_tensor_resizes_to_a_fixed_size():
    images, labels = load_uint8_tensor(_PILSet(Uint8Image(16)), batch_size=2, progress=False)
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [0, 1, 2, 3, 4]
    assert (images[:, 0, 8, 8] == torch.tensor([0, 40, 80, 120, 160], dtype=torch.uint8)).all()
    with pytest.raises(ValueError, match="Uint8Image"):
        load_uint8_tensor(_PILSet(pretrain_transform(16, (0.5,) * 3, (0.5,) * 3)), progress=False)


def test_uint8_image_passes_same_size_through():
    img = _images(1, 3, 16, 16)[0]
    out = Uint8Image(16)(img)
    assert type(out) is torch.Tensor and torch.equal(out, img)


def test_memory_checks(monkeypatch):
    assert fits_in_memory(50000, 3, 32, 32, "cpu")
    assert not fits_in_memory(3 * 1024, 1024, 1024, 1, "cpu")

    def plan(mode: str, device: str, n: int, side: int) -> tuple[int, int] | None:
        return plan_gpu_resident(mode, device, n, 3, [(side, side)], side, host_free_bytes=1 << 40, procs_on_node=1)

    assert plan("on", "cpu", 10, 512) == (512, 512)
    assert plan("off", "cuda", 10, 32) is None
    assert plan("auto", "cpu", 10, 32) is None
    with pytest.raises(ValueError):
        plan("yes", "cpu", 10, 32)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 1 << 34))  # 1 GiB free
    assert plan("auto", "cuda", 50000, 32) == (32, 32)  # 150 MB <= 256 MiB
    assert plan("auto", "cuda", 100000, 32) is None  # 300 MB > 256 MiB
    assert plan("auto", "cuda", 1000, 96) is None  # images too large for auto
