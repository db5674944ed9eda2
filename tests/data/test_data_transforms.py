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


# ---------------------------------------------------------------- data.augment (the MAE paper's Table 1e)
def _draws(t, img, seeds=range(12)) -> list[torch.Tensor]:
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(t(img))
    return out


def test_default_augment_is_the_papers_random_resized_crop_and_flip():
    """pretrain_transform called as before (and with augment=random_crop) draws exactly the hand-built recipe."""
    from torchvision.transforms import v2

    mean, std = default_stats(3)
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )
    img = _pil(48, 40)
    expected = _draws(reference, img)
    for t in (pretrain_transform(32, mean, std), pretrain_transform(32, mean, std, augment="random_crop")):
        assert all(torch.equal(a, b) for a, b in zip(_draws(t, img), expected, strict=True))


@pytest.mark.parametrize("size,crop_pct", [(32, "auto"), (32, 1.0), ((24, 40), 0.9)])
def test_augment_none_is_the_evaluation_transform(size, crop_pct):
    """No randomness and no flip (hflip=True is ignored): every draw equals eval_transform."""
    mean, std = default_stats(3)
    img = _pil(64, 50)
    expected = eval_transform(size, mean, std, crop_pct)(img)
    t = pretrain_transform(size, mean, std, hflip=True, augment="none", crop_pct=crop_pct)
    assert all(torch.equal(out, expected) for out in _draws(t, img))
    raw = pretrain_transform(size, mean, std, normalize=False, augment="none", crop_pct=crop_pct)(img)
    assert raw.dtype == torch.uint8 and raw.shape == expected.shape


def _crop_offsets(out: torch.Tensor, source: torch.Tensor) -> set[tuple[int, int, bool]]:
    """(top, left, flipped) of every crop of ``source`` [C, H, W] (or of its mirror) equal to ``out`` [C, h, w]."""
    h, w = out.shape[-2:]
    hits = set()
    for flipped, src in ((False, source), (True, source.flip(-1))):
        for top in range(source.shape[-2] - h + 1):
            for left in range(source.shape[-1] - w + 1):
                if torch.equal(src[:, top : top + h, left : left + w], out):
                    hits.add((top, left, flipped))
    return hits


def test_fixed_crop_of_a_larger_image_is_a_random_crop_at_one_scale():
    """A 64 x 48 image for a 32 px input: short side resized to int(32 / 0.875) = 36, then 32 x 32 crops of it
    (+ flips). The paper's default random resized crop does not pass this check (its scale changes)."""
    from torchvision.transforms import v2

    img = _pil(64, 48)
    resized = v2.Resize(36, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(v2.ToImage()(img))
    assert resized.shape == (3, 36, 48)
    mean, std = default_stats(3)
    outs = _draws(pretrain_transform(32, mean, std, normalize=False, augment="fixed_crop"), img, range(30))
    assert all(out.shape == (3, 32, 32) and out.dtype == torch.uint8 for out in outs)
    offsets = [_crop_offsets(out, resized) for out in outs]
    assert all(offsets), "every output is a crop of the resized image"
    assert len({next(iter(o))[:2] for o in offsets}) > 5  # crops differ between draws
    assert {f for o in offsets for _, _, f in o} == {False, True}  # flipped and not
    default = _draws(pretrain_transform(32, mean, std, normalize=False), img, range(10))
    assert not all(_crop_offsets(out, resized) for out in default)
    assert pretrain_transform((24, 40), mean, std, augment="fixed_crop")(img).shape == (3, 24, 40)


def test_fixed_crop_of_an_image_at_the_input_size_pads_then_crops():
    """A 32 x 32 image for a 32 px input (CIFAR): reflect-padded by 4 px, then 32 x 32 crops (no flip here)."""
    from torchvision.transforms import v2

    img = _pil(32, 32)
    padded = v2.functional.pad(v2.ToImage()(img), [4, 4, 4, 4], padding_mode="reflect")
    mean, std = default_stats(3)
    t = pretrain_transform(32, mean, std, hflip=False, normalize=False, augment="fixed_crop")
    offsets = [_crop_offsets(out, padded) for out in _draws(t, img, range(20))]
    assert all(any(not flipped for *_, flipped in o) for o in offsets), "every output is a crop of the padded image"
    assert len({next(iter(o))[:2] for o in offsets}) > 5  # crops differ between draws


def test_color_jitter_changes_colours_on_some_draws_and_keeps_the_default_geometry():
    """Same seed: the default's crop and flip, then ColorJitter on about 80% of the draws."""
    mean, std = default_stats(3)
    img = _pil(48, 40)
    default = _draws(pretrain_transform(32, mean, std, normalize=False), img, range(20))
    jitter = _draws(
        pretrain_transform(32, mean, std, normalize=False, augment="random_crop+color_jitter"), img, range(20)
    )
    same = [torch.equal(a, b) for a, b in zip(default, jitter, strict=True)]
    assert 0 < sum(same) < 10  # some draws left as they are, most jittered
    changed = [
        (a.float().mean((1, 2)) - b.float().mean((1, 2))).abs().max() for a, b, s in zip(default, jitter, same) if not s
    ]
    assert max(changed) > 5  # mean colour moved by more than 5 uint8 levels on some draw
    # geometry: on a grayscale image only brightness and contrast act, monotone maps of each pixel of the crop
    gray = _pil(48, 40, "L")
    m1, s1 = default_stats(1)
    default = _draws(pretrain_transform(32, m1, s1, normalize=False), gray, range(20))
    jitter = _draws(
        pretrain_transform(32, m1, s1, normalize=False, augment="random_crop+color_jitter"), gray, range(20)
    )
    assert any(not torch.equal(a, b) for a, b in zip(default, jitter, strict=True))
    for a, b in zip(default, jitter, strict=True):
        order = a.flatten().argsort(stable=True)
        assert bool((b.flatten()[order].int().diff() >= 0).all())


def test_unknown_augment_and_jitter_of_other_channel_counts_are_refused():
    mean, std = default_stats(3)
    with pytest.raises(ValueError, match="augment must be one of"):
        pretrain_transform(32, mean, std, augment="crop")
    with pytest.raises(ValueError, match="needs 1 or 3 channels, not 2"):
        pretrain_transform(32, *default_stats(2), augment="random_crop+color_jitter")
