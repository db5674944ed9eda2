"""Every registered method: the model interface the training loop relies on, learning on a fixed batch, a timm
encoder, its options (``method_args``) and its figure."""

from __future__ import annotations

import pytest
import timm
import torch
from tests.methods.tiny import build, smooth_images
from timm.models.vision_transformer import VisionTransformer

from maelab.errors import ConfigError
from maelab.methods import METHODS, get_method, method_options
from maelab.methods.options import MaskFeatOptions, SimMIMOptions, VAEOptions

NAMES = ["mae", "simmim", "maskfeat", "ae", "vae"]


def test_the_registry_lists_the_methods() -> None:
    assert sorted(METHODS) == sorted([*NAMES, "beit"])  # BEiT needs a tokenizer: tests/methods/test_beit.py
    assert all(m.summary and "\n" not in m.summary for m in METHODS.values())
    with pytest.raises(ConfigError, match="invalid method='mea': one of ae, beit, mae, maskfeat, simmim, vae"):
        get_method("mea")


@pytest.mark.parametrize("name", NAMES)
def test_model_interface(name: str) -> None:
    model = build(name)
    imgs = smooth_images()
    gen = torch.Generator().manual_seed(0)
    noise = model.draw_noise(4, "cpu", gen)
    assert noise.shape == (4, 64)
    out = model(imgs, noise=noise)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.pred.shape[:2] == (4, 64) and out.mask.shape == (4, 64) and out.mask.dtype == torch.bool
    assert model.forward_features(imgs).shape == (4, 1 + 64, 64)
    assert set(model.fsdp_units()) >= set(model.encoder.blocks)
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert isinstance(model.noise_on_cpu, bool)


@pytest.mark.parametrize("name", NAMES)
def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch(name: str) -> None:
    model = build(name).train()
    imgs = smooth_images()
    noise = model.draw_noise(4, "cpu", torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(5):
        torch.manual_seed(1)  # the same VAE sample every step
        loss = model(imgs, noise=noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    grads = [p.grad for p in model.encoder.blocks[0].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the encoder learns, not only the head


@pytest.mark.parametrize("name", NAMES)
def test_the_encoder_is_a_timm_vit_that_loads_into_timm(name: str) -> None:
    model = build(name)
    cfg = model.cfg
    assert isinstance(model.encoder, VisionTransformer)
    vit = timm.create_model(cfg.timm_name, pretrained=False, **cfg.timm_kwargs())
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = smooth_images(2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(imgs), model.forward_features(imgs))


def test_method_options_take_the_methods_defaults_and_reject_bad_keys_and_values() -> None:
    assert method_options(get_method("simmim"), {}) == SimMIMOptions(loss="l1", mask_unit="auto")
    assert method_options(get_method("maskfeat"), None) == MaskFeatOptions(loss="mse", mask_unit=None)
    assert method_options(get_method("simmim"), {"mask_unit": 16}).mask_unit == 16
    assert method_options(get_method("vae"), {"beta": 2}) == VAEOptions(beta=2.0)
    assert method_options(get_method("mae"), {}) is None
    cases = [
        ("simmim", {"beta": 1.0}, "invalid method_args.beta=1.0: simmim takes loss, mask_unit"),
        ("mae", {"loss": "l1"}, "invalid method_args.loss='l1': mae takes no options"),
        ("ae", {"beta": 1}, "invalid method_args.beta=1: ae takes no options"),
        ("simmim", {"loss": "l2"}, "invalid method_args.loss='l2': one of l1, mse"),
        ("maskfeat", {"mask_unit": 0}, "invalid method_args.mask_unit=0: a positive number of pixels"),
        ("simmim", {"mask_unit": True}, "invalid method_args.mask_unit=True: a positive number of pixels"),
        ("vae", {"beta": -1.0}, "invalid method_args.beta=-1.0: a finite number >= 0"),
        ("vae", {"beta": "big"}, "invalid method_args.beta='big': a finite number >= 0"),
    ]
    for name, raw, message in cases:
        with pytest.raises(ConfigError) as err:
            method_options(get_method(name), raw)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["simmim", "ae", "vae", "maskfeat"])
def test_pixel_methods_draw_a_reconstruction_and_maskfeat_its_hog(name: str, tmp_path) -> None:
    from maelab.models.targets import hog_target
    from maelab.viz.hog import orientation_colors, save_figure

    model = build(name).eval()
    imgs = smooth_images(2)
    with torch.no_grad():
        out = model(imgs, noise=model.draw_noise(2, "cpu", torch.Generator().manual_seed(0)))
    images = get_method(name).figure(model.cfg, imgs, out)
    assert images is not None
    torch.testing.assert_close(images["mask"][:, 0, ::4, ::4], out.mask.view(2, 8, 8).float())
    if name == "maskfeat":  # HOG: the target's orientation colour per patch, the prediction's where hidden
        target = orientation_colors(hog_target(imgs, 4))  # [2, 64, 3]
        torch.testing.assert_close(images["target"][:, :, ::4, ::4], target.view(2, 8, 8, 3).permute(0, 3, 1, 2))
        shown = torch.where(out.mask[..., None], orientation_colors(out.pred), target)
        torch.testing.assert_close(images["prediction"][:, :, ::4, ::4], shown.view(2, 8, 8, 3).permute(0, 3, 1, 2))
    else:
        assert images["reconstruction"].shape == imgs.shape
    path = save_figure(images, tmp_path / "figure.png", (0.5,) * 3, (0.5,) * 3, title="t")
    assert path.stat().st_size > 1000
