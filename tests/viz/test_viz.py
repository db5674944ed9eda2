"""Reconstruction images, the reconstruction figure and the loss curve."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from maelab.models.patches import patchify
from maelab.models.targets import pixel_target
from maelab.viz import default_title, read_metrics, reconstruct, save_loss_curve, save_reconstruction_grid

CASES = [  # (C, H, W, p)
    (3, 32, 32, 4),
    (3, 32, 48, 8),
    (1, 16, 24, 4),
    (4, 16, 16, 4),
    (2, 16, 16, 8),
]


def _batch(c: int, h: int, w: int, p: int, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(b, c, h, w, generator=g)
    n = (h // p) * (w // p)
    mask = torch.rand(b, n, generator=g) < 0.75
    mask[:, 0] = True  # at least one hidden and one visible patch
    mask[:, 1] = False
    return imgs, mask


def _pixel_mask(mask: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """[B, L] -> [B, 1, H, W]."""
    b = mask.shape[0]
    grid = mask.view(b, 1, h // p, w // p).float()
    return grid.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3).bool()


@pytest.mark.parametrize("c,h,w,p", CASES)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_perfect_prediction_reconstructs_original(c, h, w, p, norm_pix):
    imgs, mask = _batch(c, h, w, p)
    pred = pixel_target(patchify(imgs, p), norm_pix)
    out = reconstruct(imgs, pred, mask, p, norm_pix)
    for key in ("original", "masked", "reconstruction", "pasted"):
        assert out[key].shape == imgs.shape
    torch.testing.assert_close(out["original"], imgs)
    torch.testing.assert_close(out["reconstruction"], imgs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pasted"], imgs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("c,h,w,p", CASES)
def test_pasted_and_masked_respect_the_mask(c, h, w, p):
    imgs, mask = _batch(c, h, w, p, seed=1)
    pred = torch.randn(imgs.shape[0], mask.shape[1], p * p * c) + 5.0  # far from any pixel
    out = reconstruct(imgs, pred, mask, p, norm_pix_loss=False)
    hidden = _pixel_mask(mask, h, w, p).expand_as(imgs)
    assert torch.equal(out["mask"].bool(), _pixel_mask(mask, h, w, p))
    # visible patches: exactly the original, in both 'pasted' and 'masked'
    assert torch.equal(out["pasted"][~hidden], imgs[~hidden])
    assert torch.equal(out["masked"][~hidden], imgs[~hidden])
    # hidden patches: 'masked' is zero, 'pasted' is the prediction
    assert torch.all(out["masked"][hidden] == 0)
    assert torch.equal(out["pasted"][hidden], out["reconstruction"][hidden])
    assert not torch.allclose(out["pasted"][hidden], imgs[hidden])


def test_norm_pix_uses_true_patch_stats():
    imgs, mask = _batch(3, 16, 16, 4)
    target = patchify(imgs, 4)
    pred = torch.zeros_like(target)  # zero in normalized space = the patch mean
    out = reconstruct(imgs, pred, mask, 4, norm_pix_loss=True)
    expected = target.mean(-1, keepdim=True).expand_as(target)
    torch.testing.assert_close(patchify(out["reconstruction"], 4), expected)


def test_float_mask_and_bad_shapes():
    imgs, mask = _batch(3, 16, 16, 4)
    pred = patchify(imgs, 4)
    a = reconstruct(imgs, pred * 0, mask, 4, False)
    b = reconstruct(imgs, pred * 0, mask.float(), 4, False)  # HF-style 0/1 float mask
    assert torch.equal(a["pasted"], b["pasted"])
    with pytest.raises(ValueError):
        reconstruct(imgs, pred[:, 1:], mask, 4, False)
    with pytest.raises(ValueError):
        reconstruct(imgs, pred, mask[:, 1:], 4, False)


@pytest.mark.parametrize(
    "c,h,w,p",
    [
        (3, 32, 48, 8),
        (1, 16, 16, 4),
        pytest.param(4, 16, 16, 4, marks=pytest.mark.slow),
        pytest.param(2, 16, 16, 4, marks=pytest.mark.slow),
    ],
)
def test_reconstruction_grid_png(tmp_path, c, h, w, p):
    imgs, mask = _batch(c, h, w, p, b=10)
    pred = torch.randn(imgs.shape[0], mask.shape[1], p * p * c)
    out = reconstruct(imgs, pred, mask, p, norm_pix_loss=True)
    path = tmp_path / "figures" / "nested" / "recon.png"
    mean = [0.5] * c
    std = [0.25] * c
    title = default_title(True, 0.75, epoch=3)
    assert "un-normalized with the true patch mean/var" in title and "epoch 3" in title
    save_reconstruction_grid(out, path, mean, std, title=title, max_rows=4)
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
    assert [p.name for p in path.parent.iterdir()] == ["recon.png"]  # no temp file left behind
    save_reconstruction_grid(out, path, mean, std)  # overwrite in place
    with pytest.raises(ValueError):
        save_reconstruction_grid(out, path, [0.5] * (c + 1), std)


def test_hole_pixels_are_gray(tmp_path):
    imgs = torch.full((1, 3, 16, 16), 10.0)  # un-normalizes to white
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :8] = True  # top half hidden
    out = reconstruct(imgs, patchify(imgs, 4), mask, 4, norm_pix_loss=False)
    path = tmp_path / "r.png"
    save_reconstruction_grid(out, path, [0.0] * 3, [1.0] * 3)
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        # the masked column (2nd of 4): top half gray holes, bottom half white
        x = int(w * 1.5 / 4)
        col = [rgb.getpixel((x, y)) for y in range(h)]
    assert any(abs(px[0] - 128) <= 2 and px[0] == px[1] == px[2] for px in col)
    assert any(px == (255, 255, 255) for px in col)


def test_default_title_pixel():
    t = default_title(False, 0.75)
    assert "75%" in t and "norm_pix" not in t


def test_read_metrics_and_loss_curve(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": e, "loss": 2.0 / (e + 1) ** 2, "lr": 1e-4, "img_per_s": 100.0}) for e in range(6)]
    lines.insert(2, "")
    lines.insert(3, '{"epoch": 9, "loss": ')  # truncated write
    lines.insert(4, "not json")
    lines.insert(5, "[1, 2]")
    lines.append(json.dumps({"epoch": 5, "knn_top1": 31.5}))
    lines.append(json.dumps({"epoch": 5.5, "step": 60, "loss": 0.05}))
    lines.append(json.dumps({"epoch": 6, "loss": float("nan")}).replace("NaN", "NaN"))
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe garbage\n")
    records = read_metrics(path)
    assert len(records) == 9
    assert records[0]["epoch"] == 0
    out = tmp_path / "figures" / "loss.png"
    save_loss_curve(records, out)
    with Image.open(out) as im:
        assert im.format == "PNG"
    save_loss_curve([], tmp_path / "empty.png")  # nothing to plot still writes a figure
    assert (tmp_path / "empty.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing.jsonl")


def test_epoch_records_that_also_carry_a_step_are_plotted_per_epoch():
    from maelab.viz.curves import split_records

    epoch_recs = [{"epoch": 1, "step": 10, "loss": 1.0}, {"epoch": 2, "step": 20, "loss": 0.5, "knn_top1": 30.0}]
    step_recs = [{"step": 5, "loss": 1.2}]
    main, steps = split_records(epoch_recs + step_recs, "epoch")
    assert main == epoch_recs and steps == step_recs
    assert split_records(epoch_recs + step_recs, "step") == (epoch_recs + step_recs, [])
