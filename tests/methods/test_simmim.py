"""SimMIM: mask tokens in the encoder's input, unit-aligned exact-count masks, L1 over the hidden pixels only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.methods.tiny import build, smooth_images, tiny_config

from maelab.errors import ConfigError
from maelab.methods.masked_encoder import MaskedEncoder, resolve_mask_unit
from maelab.models.patches import unpatchify

UNITS = 16  # 32 px images in 8 px units: 4 x 4 units of 2 x 2 patches
HIDDEN_UNITS = math.ceil(UNITS * 0.6)  # SimMIM's MaskGenerator: 10


def simmim(**method_args: object) -> MaskedEncoder:
    model = build("simmim", method_args)
    assert isinstance(model, MaskedEncoder)
    return model


def test_defaults_are_simmims() -> None:
    model = simmim()
    assert model.cfg.mask_ratio == 0.6 and model.cfg.target == "pixels"
    assert model.options.loss == "l1" and model.mask_unit == 8
    assert model.num_masked == HIDDEN_UNITS * 4


def test_encoder_gets_every_token_with_mask_tokens_before_the_position_embedding() -> None:
    model = simmim().eval()
    imgs = smooth_images()
    noise = model.draw_noise(imgs.shape[0], "cpu", torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(imgs, noise=noise)
        enc = model.encoder
        tokens = enc.patch_embed(imgs)  # [B, L, D]
        tokens = torch.where(out.mask[..., None], model.mask_token, tokens) + enc.pos_embed[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(imgs.shape[0], -1, -1)
    (x,) = seen
    assert x.shape == (4, 1 + 64, 64)
    torch.testing.assert_close(x, torch.cat([cls, tokens], dim=1))


def test_masks_are_whole_units_at_the_requested_ratio() -> None:
    model = simmim()
    noise = model.draw_noise(32, "cpu", torch.Generator().manual_seed(0))
    mask = model.mask_from_noise(noise)
    units = mask.view(32, 4, 2, 4, 2)  # [B, unit row, patch row in unit, unit col, patch col in unit]
    per_unit = units.sum(dim=(2, 4))  # hidden patches per unit: 0 or 4
    assert ((per_unit == 0) | (per_unit == 4)).all()
    assert ((per_unit == 4).sum(dim=(1, 2)) == HIDDEN_UNITS).all()
    assert (mask.sum(dim=1) == HIDDEN_UNITS * 4).all()
    assert len({tuple(m.tolist()) for m in mask}) > 1  # masks differ between images
    out = model(smooth_images(32), noise=noise)
    assert torch.equal(out.mask, mask)


def test_same_generator_state_gives_the_same_mask_and_rows_give_the_batchs_rows() -> None:
    model = simmim()
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    full = model.draw_noise(8, "cpu", gen)
    after_full = gen.get_state()
    gen.set_state(state)
    assert torch.equal(model.draw_noise(8, "cpu", gen), full)
    gen.set_state(state)
    rows = model.draw_noise(8, "cpu", gen, range(1, 8, 2))
    assert torch.equal(rows, full[1::2])
    assert torch.equal(gen.get_state(), after_full)  # the generator advances as for the whole batch
    assert not torch.equal(model.draw_noise(8, "cpu", gen), full)


def test_l1_covers_exactly_the_hidden_pixels_with_simmims_normalization() -> None:
    model = simmim()
    imgs = smooth_images()
    noise = model.draw_noise(imgs.shape[0], "cpu", torch.Generator().manual_seed(3))
    out = model(imgs, noise=noise)
    # SimMIM's forward: the mask upsampled to pixels, L1 summed / (mask.sum() + 1e-5) / in_chans
    x_rec = unpatchify(out.pred, 4, (8, 8), 3)
    pix_mask = out.mask.view(4, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expected = (F.l1_loss(imgs, x_rec, reduction="none") * pix_mask).sum() / (pix_mask.sum() + 1e-5) / 3
    torch.testing.assert_close(out.loss, expected)

    target = out.pred.detach() + 1.0  # |diff| = 1 everywhere
    base = model.forward_loss(out.pred, target, out.mask)
    visible = (~out.mask[0]).nonzero()[0, 0]
    hidden = out.mask[0].nonzero()[0, 0]
    changed = target.clone()
    changed[0, visible] += 5.0
    torch.testing.assert_close(model.forward_loss(out.pred, changed, out.mask), base)
    changed = target.clone()
    changed[0, hidden, 0] += 5.0
    assert model.forward_loss(out.pred, changed, out.mask) > base


@pytest.mark.parametrize(
    ("img_size", "patch_size", "unit"), [(32, 4, 8), (32, 2, 8), (224, 16, 32), (192, 16, 32), (224, 14, 28)]
)
def test_auto_mask_unit_scales_with_the_image(img_size: int, patch_size: int, unit: int) -> None:
    cfg = tiny_config("simmim", img_size=img_size, patch_size=patch_size)
    assert resolve_mask_unit("auto", cfg) == unit


def test_a_mask_unit_must_tile_the_image_in_whole_patches() -> None:
    cfg = tiny_config("simmim")
    assert resolve_mask_unit(16, cfg) == 16
    for bad in (6, 12):  # 6 is no multiple of the 4 px patch; 12 does not divide 32 px
        with pytest.raises(ConfigError, match=f"invalid method_args.mask_unit={bad}: must be a multiple"):
            resolve_mask_unit(bad, cfg)
    with pytest.raises(ConfigError, match="mask units are masked at random"):
        build("simmim", None, mask_type="block")
