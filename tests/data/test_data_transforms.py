"""Per-sample transforms: shapes, dtypes, normalization, determinism, any channel count."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from maelab.data import default_stats, eval_transform, pretrain_transform


def _pil(w: int = 48, h: int = 40, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(0)
    c = 3 if mode == "RGB" else 1
    arr = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=g).numpy()
    return Image.fromarray(arr if c == 3 else arr[..., 0], mode)


def test_default_stats():
    assert default_stats(3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_stats(1) == ((0.5,), (0.5,))
    assert default_stats(5) == ((0.5,) * 5, (0.5,) * 5)


@pytest.mark.parametrize("size", [32, (24, 40)])
def test_pretrain_shape_dtype_plain_tensor(size):
    mean, std = default_stats(3)
    out = pretrain_transform(size, mean, std)(_pil())
    hw = (size, size) if isinstance(size, int) else size
    assert out.shape == (3, *hw) and out.dtype == torch.float32
    assert type(out) is torch.Tensor  # not a tv_tensors subclass, so collate stays plain


def test_normalization_values():
    img = Image.new("RGB", (20, 20), (255, 0, 128))
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    out = eval_transform(16, mean, std, crop_pct=1.0)(img)
    expected = torch.tensor([(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, 128 / 255])
    torch.testing.assert_close(out.mean((1, 2)), expected, atol=1e-4, rtol=0)


def test_eval_deterministic_and_center_crop():
    mean, std = default_stats(3)
    t = eval_transform(32, mean, std)
    img = _pil(64, 50)
    torch.manual_seed(1)
    a = t(img)
    torch.manual_seed(2)
    b = t(img)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert eval_transform((16, 24), mean, std)(img).shape == (3, 16, 24)
    assert eval_transform((16, 24), mean, std, crop_pct=1.0)(img).shape == (3, 16, 24)
    with pytest.raises(ValueError):
        eval_transform(32, mean, std, crop_pct=0)


def _framed(side: int = 512, frame: int = 8) -> Image.Image:
    """A green square with a red frame ``frame`` px wide (1/64 of the side)."""
    img = Image.new("RGB", (side, side), (255, 0, 0))
    img.paste((0, 255, 0), (frame, frame, side - frame, side - frame))
    return img


@pytest.mark.parametrize("size,crop_pct", [(32, 0.875), (224, 0.875), (225, 1.0), (384, 1.0), ((200, 256), 1.0)])
def test_auto_crop_pct_is_the_official_rule(size, crop_pct):
    """facebookresearch/mae util/datasets.py: crop_pct = 224/256 for inputs up to 224 px, else 1.0."""
    from maelab.data.transforms import resolve_crop_pct

    assert resolve_crop_pct("auto", size) == crop_pct
    assert resolve_crop_pct(0.9, size) == 0.9


@pytest.mark.parametrize("size,frame_kept", [(224, False), (256, True)])
def test_auto_eval_crop_keeps_the_whole_image_above_224_px(size, frame_kept):
    """224 px: resize to 256, center 224 (the 1/64 frame is cut away); 256 px: crop_pct 1.0, the frame stays."""
    out = eval_transform(size, (0.0,) * 3, (1.0,) * 3)(_framed())
    assert out.shape == (3, size, size)
    edges = torch.cat([out[:, 0], out[:, -1], out[:, :, 0], out[:, :, -1]], dim=1)  # [3, 4 * size]
    red = (edges[0] > 0.5) & (edges[1] < 0.5)
    assert bool(red.all()) if frame_kept else not bool(red.any())


def test_eval_crop_at_crop_pct_1_is_centred_and_keeps_the_aspect():
    """An oblong 2:1 image at crop_pct 1.0: short side to the size, then the center square (not a squeeze)."""
    img = Image.new("RGB", (512, 256), (255, 0, 0))  # left quarter red, middle half green, right quarter blue
    img.paste((0, 255, 0), (128, 0, 384, 256))
    img.paste((0, 0, 255), (384, 0, 512, 256))
    out = eval_transform(256, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)(img)
    assert out.shape == (3, 256, 256)
    torch.testing.assert_close(out.mean((1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=1e-3, rtol=0)


def _crops(crop: str, height: int, width: int, n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> list[dict]:
    from maelab.data.transforms import RESIZED_CROPS

    t = RESIZED_CROPS[crop](224, scale=scale, ratio=ratio)
    img = torch.zeros(3, height, width, dtype=torch.uint8)
    torch.manual_seed(0)
    return [t.make_params([img]) for _ in range(n)]


def test_official_probe_crop_stays_inside_the_image():
    for h, w in [(30, 50), (50, 30), (1, 1)]:
        crops = _crops("official", h, w, 500, scale=(0.5, 1.0), ratio=(0.25, 4.0))
        for c in crops:
            assert 1 <= c["height"] <= h and 1 <= c["width"] <= w, c
            assert 0 <= c["top"] <= h - c["height"] and 0 <= c["left"] <= w - c["width"], c
        if h > 1:  # draws too wide or too tall for the image were clipped to its side
            assert any(c["width"] == w for c in crops) and any(c["height"] == h for c in crops)


def test_official_probe_crop_clips_its_one_draw_instead_of_retrying():
    """Area ~ 0.995 of a square at aspect ~ 3.95: no draw fits, so torchvision falls back to a centered
    width x width/3.95 crop; the official crop clips the first draw: the full width, half the height."""
    for c in _crops("official", 100, 100, 50, scale=(0.99, 1.0), ratio=(3.9, 4.0)):
        assert c["width"] == 100 and 49 <= c["height"] <= 51, c
    assert {c["height"] for c in _crops("torchvision", 100, 100, 5, scale=(0.99, 1.0), ratio=(3.9, 4.0))} == {26}
    assert len({c["top"] for c in _crops("official", 100, 100, 50, scale=(0.99, 1.0), ratio=(3.9, 4.0))}) > 10


def test_official_probe_crop_keeps_larger_crops_than_torchvision():
    """On a 4:3 image (ImageNet's usual shape) with scale (0.08, 1): mean crop area about 0.52 vs 0.44 of the image
    (2000 draws: standard error about 0.006)."""

    def mean_area(crop: str) -> float:
        crops = _crops(crop, 375, 500, 2000)
        return sum(c["height"] * c["width"] for c in crops) / (len(crops) * 375 * 500)

    official, torchvision = mean_area("official"), mean_area("torchvision")
    assert official == pytest.approx(0.515, abs=0.02) and torchvision == pytest.approx(0.435, abs=0.02)
    assert official - torchvision > 0.05


def test_pretrain_reproducible_under_seed():
    mean, std = default_stats(3)
    t = pretrain_transform(32, mean, std)
    img = _pil()
    torch.manual_seed(123)
    a = t(img)
    torch.manual_seed(123)
    b = t(img)
    torch.manual_seed(124)
    c = t(img)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_uint8_tensor_any_channels(channels):
    x = torch.randint(0, 256, (channels, 20, 28), dtype=torch.uint8)
    mean, std = default_stats(channels)
    assert pretrain_transform((16, 8), mean, std)(x).shape == (channels, 16, 8)
    assert eval_transform(16, mean, std)(x).shape == (channels, 16, 16)


def test_grayscale_pil_and_tiny_images_upscale():
    mean, std = default_stats(1)
    assert pretrain_transform(32, mean, std)(_pil(mode="L")).shape == (1, 32, 32)
    one = Image.new("RGB", (1, 1), (10, 20, 30))
    m3, s3 = default_stats(3)
    assert pretrain_transform(32, m3, s3)(one).shape == (3, 32, 32)
    assert eval_transform(32, m3, s3)(one).shape == (3, 32, 32)


def test_no_flip_when_disabled():
    # Left half black, right half white; full-scale crops keep the layout unless flipped.
    img = Image.new("L", (32, 32), 0)
    img.paste(255, (16, 0, 32, 32))
    t = pretrain_transform(32, (0.0,), (1.0,), min_scale=1.0, hflip=False)
    for s in range(10):
        torch.manual_seed(s)
        out = t(img)
        assert out[0, :, :12].mean() < 0.2 and out[0, :, 20:].mean() > 0.8
