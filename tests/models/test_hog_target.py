"""MaskFeat's HOG target, checked against a direct per-pixel reference."""

import math

import numpy as np
import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS

import maelab
from maelab.models.targets import hog_dim, hog_target


def reference_hog(img: np.ndarray, patch: int, nbins: int = 9, cell: int = 8) -> np.ndarray:
    """Loop-by-loop HOG of one image [C, H, W] -> [L, cells*C*nbins] (same rules, no vectorization)."""
    c, h, w = img.shape
    cell = min(cell, patch)
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    win = np.exp(-0.5 * ((np.arange(patch) - (patch - 1) / 2) / (patch / 2)) ** 2)
    win2 = np.outer(win, win)
    win2 /= win2.sum()
    hist = np.zeros((c, nbins, h // cell, w // cell))
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                p = padded[ch, y : y + 3, x : x + 3]
                gx = (p[0, 0] + 2 * p[1, 0] + p[2, 0]) - (p[0, 2] + 2 * p[1, 2] + p[2, 2])
                gy = (p[0, 0] + 2 * p[0, 1] + p[0, 2]) - (p[2, 0] + 2 * p[2, 1] + p[2, 2])
                mag = math.hypot(gx, gy) * win2[y % patch, x % patch]
                b = int(math.floor(math.atan2(gx, gy) / math.pi * nbins)) % nbins
                hist[ch, b, y // cell, x // cell] += mag
    norm = np.sqrt((hist**2).sum(axis=1, keepdims=True))
    hist = hist / np.maximum(norm, 1e-12)
    k = patch // cell
    out = []
    for py in range(h // patch):
        for px in range(w // patch):
            cells = [hist[:, :, py * k + i, px * k + j].reshape(-1) for i in range(k) for j in range(k)]
            out.append(np.concatenate(cells))
    return np.stack(out)


@pytest.mark.parametrize("shape, patch", [((3, 16, 32), 16), ((1, 8, 8), 4), ((2, 16, 16), 8)])
def test_hog_matches_direct_reference(shape, patch):
    torch.manual_seed(0)
    img = torch.randn(*shape, dtype=torch.float64)
    ours = hog_target(img[None].float(), patch)[0].numpy()
    ref = reference_hog(img.numpy(), patch)
    assert ours.shape == ref.shape == ((shape[1] // patch) * (shape[2] // patch), hog_dim(patch, shape[0]))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_hog_cells_are_unit_norm_and_see_orientation():
    x = torch.arange(32.0).repeat(32, 1)  # intensity grows left to right: one gradient direction
    hog = hog_target(x.expand(1, 3, 32, 32).clone(), 16)  # [1, 4, 108]
    per_cell = hog.view(1, 4, 4, 3, 9)
    norms = per_cell.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert (per_cell.argmax(dim=-1) == per_cell.argmax(dim=-1).flatten()[0]).all()  # one dominant bin everywhere


def test_hog_target_model_trains():
    model = maelab.create_model("mae_vit_pico_patch4_32", target="hog", **TINY_MODEL_ARGS)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.pred.shape == (2, 64, hog_dim(4, 3))
    out.loss.backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    with pytest.raises(maelab.ConfigError, match="target"):
        maelab.create_model("mae_vit_pico_patch4_32", target="dvae")


@pytest.mark.parametrize("gaussian", [True, False])
def test_hog_is_computed_in_fp32_under_bf16_autocast(gaussian):
    """The default CUDA precision is bf16 autocast: the target must not change with it (a bf16
    Sobel conv misassigns orientation bins), and the un-windowed variant must not crash."""
    imgs = torch.rand(2, 3, 16, 16)
    exact = hog_target(imgs, 8, gaussian=gaussian)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = hog_target(imgs, 8, gaussian=gaussian)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, exact)


def test_hog_figure_colours_a_vertical_edge_by_the_horizontal_gradient_bin():
    """The MaskFeat figure shows a patch's dominant orientation: a vertical edge's patches are fully saturated in
    the horizontal-gradient bin's hue, a flat patch is black (no dominant orientation)."""
    import matplotlib.colors

    from maelab.viz.hog import orientation_colors, orientation_histogram

    img = torch.zeros(1, 1, 16, 16)
    img[..., 8:] = 1.0  # a vertical edge between columns 7 and 8: patches (0, 0)/(0, 1) at patch size 8
    hog = hog_target(img, 8)
    hist = orientation_histogram(hog)
    # bin 4 of 9 (80-100 degrees of atan2(gx, gy)): the horizontal gradient
    assert hist[0, 0].argmax().item() == 4 and hist[0, 0, 4] > 0.5
    colours = orientation_colors(hog)[0]
    hue, _, value = matplotlib.colors.rgb_to_hsv(colours[0].numpy())
    assert abs(hue - 4 / 9) < 1e-6 and value > 0.5
    flat = orientation_colors(hog_target(torch.ones(1, 1, 16, 16), 8))[0]
    assert torch.equal(flat, torch.zeros_like(flat))
