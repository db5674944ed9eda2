"""AE and VAE baselines: no masking, a loss over every patch, and the VAE's KL term in closed form."""

from __future__ import annotations

import torch
from tests.methods.tiny import build, smooth_images
from torch.distributions import Normal, kl_divergence

from maelab.methods.autoencoder import Autoencoder
from maelab.models.patches import patchify


def autoencoder(method: str, **method_args: object) -> Autoencoder:
    model = build(method, method_args)
    assert isinstance(model, Autoencoder)
    return model


def test_nothing_is_masked() -> None:
    model = autoencoder("ae")
    gen = torch.Generator().manual_seed(0)
    noise = model.draw_noise(6, "cpu", gen, range(1, 6, 2))
    assert noise.shape == (3, 64) and not noise.any()
    out = model(smooth_images(), noise=torch.zeros(4, 64))
    assert out.mask.shape == (4, 64) and out.mask.dtype == torch.bool and not out.mask.any()
    assert out.pred.shape == (4, 64, 4 * 4 * 3)


def test_ae_loss_is_the_mse_over_every_patch() -> None:
    model = autoencoder("ae")
    imgs = smooth_images()
    out = model(imgs)
    torch.testing.assert_close(out.loss, (out.pred - patchify(imgs, 4)).pow(2).mean())
    assert out.kl == 0

    # every patch of the target counts: changing any one changes the loss
    pred = out.pred.detach()
    target = pred + 1.0
    base = model.forward_loss(pred, target)
    for image, patch in ((0, 0), (1, 9), (2, 37), (3, 63)):
        changed = target.clone()
        changed[image, patch, 0] += 1.0
        assert model.forward_loss(pred, changed) > base, (image, patch)


def test_vae_kl_matches_the_closed_form_and_enters_the_loss_with_beta() -> None:
    model = autoencoder("vae", beta=0.5)
    captured: dict[str, torch.Tensor] = {}
    model.latent_mean.register_forward_hook(lambda _m, _a, out: captured.__setitem__("mu", out))
    model.latent_logvar.register_forward_hook(lambda _m, _a, out: captured.__setitem__("logvar", out))
    with torch.no_grad():
        out = model(smooth_images())
    mu, logvar = captured["mu"], captured["logvar"]
    assert mu.shape == logvar.shape == (4, 1 + 64, 64)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(out.kl, expected)
    assert out.kl > 0
    torch.testing.assert_close(out.loss, out.recon_loss + 0.5 * out.kl)


def test_vae_samples_in_training_and_decodes_the_mean_in_evaluation() -> None:
    model = autoencoder("vae")
    imgs = smooth_images()
    with torch.no_grad():
        assert not torch.equal(model(imgs).pred, model(imgs).pred)
        model.eval()
        assert torch.equal(model(imgs).pred, model(imgs).pred)
