"""SimMIM with a Swin encoder: every patch-embedding token reaches the first stage (hidden ones as the mask token),
unit-aligned exact-count masks, L1 over the hidden pixels only, a head whose output has the image's size, and
one-line ConfigErrors for what a Swin cannot do."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import torch
from tests.methods.tiny import smooth_images
from torch import nn

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.methods import get_method, method_model_config, method_options
from maelab.methods.swin import SwinMaskedEncoder
from maelab.methods.vit import image_hw
from maelab.models.patches import patchify

PICO = "swin_pico_patch2_window4_32"
"""32 px, 2 px patches (a 16 x 16 grid, L = 256), windows of 4, dims 32-64-128, depths 2-2-2: stride 8."""
GRID = 16
UNIT_PATCHES = 4  # SimMIM's 8 px mask units at 32 px ("auto") are 4 x 4 patches of 2 px
UNITS = (GRID // UNIT_PATCHES) ** 2  # 16
HIDDEN_UNITS = math.ceil(UNITS * 0.6)  # SimMIM's MaskGenerator: 10
FOUR_STAGES: dict[str, Any] = dict(img_size=64, embed_dim=16, num_heads=1, depths=(1, 1, 1, 1), window_size=2)
"""``swin_tiny_patch4_window7_224`` shrunk: four stages of 4 px patches (stride 32) on 64 px images."""


def swin_config(model: str = PICO, **model_args: Any) -> ModelConfig:
    """``model`` with SimMIM's model defaults and ``model_args``."""
    return method_model_config(get_method("simmim"), model, model_args)


def swin_simmim(model: str = PICO, **model_args: Any) -> SwinMaskedEncoder:
    """A seeded SimMIM model on the Swin preset ``model``, built through the method registry."""
    torch.manual_seed(0)
    method = get_method("simmim")
    built = method.build(swin_config(model, **model_args), method_options(method, {}))
    assert isinstance(built, SwinMaskedEncoder)
    return built


@pytest.fixture(scope="module")
def pico() -> SwinMaskedEncoder:
    return swin_simmim().eval()


def noise_for(model: SwinMaskedEncoder, batch: int, seed: int) -> torch.Tensor:
    return model.draw_noise(batch, "cpu", torch.Generator().manual_seed(seed))


def test_pico_preset_is_the_described_swin(pico: SwinMaskedEncoder) -> None:
    cfg = pico.cfg
    assert (cfg.encoder, cfg.grid_size, cfg.encoder_stride, cfg.num_features) == ("swin", (GRID, GRID), 8, 128)
    assert [len(cast(nn.Sequential, stage.blocks)) for stage in pico.swin.layers] == [2, 2, 2]
    assert pico.mask_unit == 8 and pico.num_masked == HIDDEN_UNITS * UNIT_PATCHES**2


def test_first_stage_gets_every_patch_embedding_with_the_mask_token_on_the_hidden_ones(
    pico: SwinMaskedEncoder,
) -> None:
    imgs = smooth_images()
    noise = noise_for(pico, imgs.shape[0], 1)
    seen: list[torch.Tensor] = []
    hook = pico.swin.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = pico(imgs, noise=noise)
            embedded = pico.swin.patch_embed(imgs)  # [B, 16, 16, 32], timm's NHWC Swin
    finally:
        hook.remove()
    (x,) = seen
    assert x.shape == (4, GRID, GRID, 32)  # all L = 256 tokens, none dropped
    hidden = out.mask.view(4, GRID, GRID)  # the mask in row-major patch order, as patchify's
    assert 0 < int(hidden.sum()) < hidden.numel()
    assert torch.equal(x[hidden], pico.mask_token.view(1, -1).expand(int(hidden.sum()), -1))
    assert torch.equal(x[~hidden], embedded[~hidden])


def test_masks_are_whole_units_at_the_requested_ratio(pico: SwinMaskedEncoder) -> None:
    batch = 32
    noise = noise_for(pico, batch, 0)
    mask = pico.mask_from_noise(noise)
    side = GRID // UNIT_PATCHES
    units = mask.view(batch, side, UNIT_PATCHES, side, UNIT_PATCHES)  # [B, unit row, row in unit, unit col, col]
    per_unit = units.sum(dim=(2, 4))  # hidden patches per unit: none or all 16
    assert ((per_unit == 0) | (per_unit == UNIT_PATCHES**2)).all()
    assert ((per_unit == UNIT_PATCHES**2).sum(dim=(1, 2)) == HIDDEN_UNITS).all()
    assert (mask.sum(dim=1) == HIDDEN_UNITS * UNIT_PATCHES**2).all()
    assert len({tuple(m.tolist()) for m in mask}) > 1  # masks differ between images
    with torch.no_grad():
        out = pico(smooth_images(batch), noise=noise)
    assert torch.equal(out.mask, mask)


def pixel_mask(mask: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, L] patch mask -> [B, 1, H, W] float, SimMIM's ``repeat_interleave`` upsampling."""
    side = math.isqrt(mask.shape[1])
    grid = mask.view(-1, side, side)
    return grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).float()


def test_l1_is_simmims_over_the_hidden_pixels_of_the_heads_image(pico: SwinMaskedEncoder) -> None:
    imgs = smooth_images()
    noise = noise_for(pico, imgs.shape[0], 3)
    heads: list[torch.Tensor] = []
    hook = pico.head.register_forward_hook(lambda _m, _args, output: heads.append(output))
    try:
        with torch.no_grad():
            out = pico(imgs, noise=noise)
    finally:
        hook.remove()
    (x_rec,) = heads  # the head's raw image, [B, 3, H, W]
    mask_px = pixel_mask(out.mask)
    expected = ((imgs - x_rec).abs() * mask_px).sum() / (mask_px.sum() + 1e-5) / 3
    torch.testing.assert_close(out.loss, expected)


def test_changing_the_prediction_on_visible_pixels_leaves_the_loss_unchanged(pico: SwinMaskedEncoder) -> None:
    imgs = smooth_images()
    noise = noise_for(pico, imgs.shape[0], 4)

    def run(shift: torch.Tensor | None) -> Any:
        hook = pico.head.register_forward_hook(lambda _m, _args, output: None if shift is None else output + shift)
        try:
            with torch.no_grad():
                return pico(imgs, noise=noise)
        finally:
            hook.remove()

    base = run(None)
    mask_px = pixel_mask(base.mask)
    visible = run(100.0 * (1.0 - mask_px))  # every visible pixel of every channel moved far away
    assert not torch.equal(visible.pred, base.pred)  # the head's output did change
    assert torch.equal(visible.loss, base.loss)
    one_hidden = torch.zeros_like(imgs)
    b, _, i, j = (mask_px > 0).nonzero()[0].tolist()
    one_hidden[b, 0, i, j] = 100.0
    assert run(one_hidden).loss > base.loss  # a single hidden pixel does count


@pytest.mark.parametrize(
    ("model", "model_args", "latent_hw"),
    [(PICO, {}, 4), ("swin_tiny_patch4_window7_224", FOUR_STAGES, 2)],
    ids=["pico-3-stages-stride-8", "4-stages-stride-32"],
)
def test_head_turns_the_last_stage_into_an_image_of_the_input_size(
    model: str, model_args: dict[str, Any], latent_hw: int
) -> None:
    net = swin_simmim(model, **model_args).eval()
    (size, _), p = image_hw(net.cfg), net.cfg.patch_size
    assert size // net.cfg.encoder_stride == latent_hw
    imgs = torch.randn(2, 3, size, size)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = net.head.register_forward_hook(lambda _m, args, output: seen.append((args[0], output)))
    try:
        with torch.no_grad():
            out = net(imgs, noise=noise_for(net, 2, 0))
    finally:
        hook.remove()
    ((latent, image),) = seen
    assert latent.shape == (2, net.cfg.num_features, latent_hw, latent_hw)  # the last stage's map
    assert image.shape == (2, 3, size, size)
    assert out.pred.shape == (2, (size // p) ** 2, p * p * 3)
    assert torch.equal(out.pred, patchify(image, p))


# ---------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("method", ["mae", "maskfeat", "beit", "ae", "vae"])
def test_other_methods_refuse_a_swin_preset_in_one_line(method: str) -> None:
    with pytest.raises(ConfigError) as e:
        method_model_config(get_method(method), PICO)
    msg = str(e.value)
    assert msg.startswith(f"invalid model={PICO!r} for method={method!r}: a swin encoder") and "\n" not in msg


def test_hog_target_with_a_swin_is_one_line_naming_the_target() -> None:
    method = get_method("simmim")
    cfg = swin_config(target="hog")
    with pytest.raises(ConfigError) as e:
        method.build(cfg, method_options(method, {}))
    msg = str(e.value)
    assert msg.startswith("invalid model_args.target='hog': the Swin head predicts pixels") and "\n" not in msg


@pytest.mark.parametrize(
    ("model", "model_args", "stride"),
    [(PICO, {"img_size": 36}, 8), ("swin_tiny_patch4_window7_224", {**FOUR_STAGES, "img_size": 48}, 32)],
    ids=["pico-36px", "4-stages-48px"],
)
def test_an_image_the_stride_does_not_divide_is_one_line_naming_img_size(
    model: str, model_args: dict[str, Any], stride: int
) -> None:
    with pytest.raises(ConfigError) as e:  # 36 = 18 patches of 2 px, 48 = 12 of 4 px: whole patches, not strides
        swin_config(model, **model_args)
    msg = str(e.value)
    assert msg.startswith(f"invalid model_args.img_size={model_args['img_size']}") and "\n" not in msg
    assert f"stride {stride}" in msg
