"""MaskFeat: block masks hiding 40% of the patches, MSE against the HOG target on the hidden patches only."""

from __future__ import annotations

import torch
from tests.methods.tiny import build, smooth_images

from maelab.methods.masked_encoder import MaskedEncoder
from maelab.models.masking import num_kept
from maelab.models.targets import hog_dim, hog_target

L = 64
HIDDEN = L - num_kept(L, 0.4)  # 26 of 64 patches, as MAE's exact count at 40%


def maskfeat() -> MaskedEncoder:
    model = build("maskfeat")
    assert isinstance(model, MaskedEncoder)
    return model


def test_defaults_are_maskfeats() -> None:
    model = maskfeat()
    cfg = model.cfg
    assert (cfg.mask_type, cfg.mask_ratio, cfg.target) == ("block", 0.4, "hog")
    assert model.options.loss == "mse" and model.mask_unit is None
    assert model.noise_on_cpu  # block masks are drawn on the host


def test_block_masks_hide_forty_percent_of_the_patches_in_blocks() -> None:
    model = maskfeat()
    gen = torch.Generator().manual_seed(0)
    mask = model.mask_from_noise(model.draw_noise(16, "cpu", gen))
    assert HIDDEN == 26
    assert (mask.sum(dim=1) == HIDDEN).all()
    # BEiT blocks: hidden patches lie side by side; adjacent hidden pairs per hidden patch are about 1.5 here,
    # below 0.75 for random masks at 40%
    grid = mask.view(16, 8, 8)
    pairs = (grid[:, 1:] & grid[:, :-1]).sum() + (grid[:, :, 1:] & grid[:, :, :-1]).sum()
    assert pairs / grid.sum() > 1.2


def test_loss_is_mse_against_hog_on_the_hidden_patches_only() -> None:
    model = maskfeat()
    imgs = smooth_images()
    noise = model.draw_noise(imgs.shape[0], "cpu", torch.Generator().manual_seed(1))
    out = model(imgs, noise=noise)
    hog = hog_target(imgs, 4)
    assert out.pred.shape == hog.shape == (4, L, hog_dim(4, 3))
    expected = (out.pred - hog).pow(2).mean(dim=-1)[out.mask].mean()
    torch.testing.assert_close(out.loss, expected)

    base = model.forward_loss(out.pred, hog, out.mask)
    visible = (~out.mask[0]).nonzero()[0, 0]
    hidden = out.mask[0].nonzero()[0, 0]
    changed = hog.clone()
    changed[0, visible] += 5.0
    torch.testing.assert_close(model.forward_loss(out.pred, changed, out.mask), base)
    changed = hog.clone()
    changed[0, hidden] += 5.0
    assert model.forward_loss(out.pred, changed, out.mask) > base
