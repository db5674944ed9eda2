"""MaskedAutoencoder: what enters the encoder/decoder, shapes, loss formula, gradients, init, inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maelab.errors import ConfigError
from maelab.models.masking import masking_from_noise
from maelab.models.pos_embed import sincos_2d
from maelab.models.registry import create_model

TINY = dict(depth=2, embed_dim=64, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny(**overrides):
    return create_model("mae_vit_pico_patch4_32", **{**TINY, **overrides})


def official_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    n, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def official_loss(imgs, pred, mask, p, norm_pix_loss):
    """facebookresearch/mae ``forward_loss`` (mask: 1 = removed)."""
    target = official_patchify(imgs.double(), p)
    if norm_pix_loss:
        d = target.shape[-1]
        mean = target.sum(-1, keepdim=True) / d
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (d - 1)  # unbiased
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred.double() - target) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.double()
    return (loss * mask).sum() / mask.sum()


def masked_like(model, imgs_shape, seed=0):
    b = imgs_shape[0]
    return torch.rand(b, model.num_patches, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- what the blocks see
def test_encoder_sees_only_visible_tokens_and_decoder_sees_all() -> None:
    torch.manual_seed(0)
    model = tiny(decoder_depth=2).eval()
    b, length, keep = 3, 64, int(64 * (1 - 0.75))
    imgs = torch.randn(b, 3, 32, 32)
    noise = masked_like(model, imgs.shape)
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()

        return hook

    handles = [blk.register_forward_pre_hook(grab(f"enc{i}")) for i, blk in enumerate(model.encoder.blocks)]
    handles += [blk.register_forward_pre_hook(grab(f"dec{i}")) for i, blk in enumerate(model.decoder_blocks)]
    handles.append(model.encoder.norm.register_forward_hook(lambda m, a, out: seen.__setitem__("latent", out)))
    with torch.no_grad():
        out = model(imgs, noise=noise)
    for h in handles:
        h.remove()

    assert len(model.encoder.blocks) == 2 and len(model.decoder_blocks) == 2
    for i in range(2):
        assert seen[f"enc{i}"].shape == (b, 1 + keep, 64)
        assert seen[f"dec{i}"].shape == (b, 1 + length, 32)

    # encoder input == [cls + pos0, (patch embedding + pos) of the kept patches], computed independently
    enc = model.encoder
    w = enc.patch_embed.proj.weight  # [D, C, p, p] -> linear on (row, col, channel)-ordered patch vectors
    w_lin = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    with torch.no_grad():
        tokens = official_patchify(imgs, 4) @ w_lin.T + enc.patch_embed.proj.bias + enc.pos_embed[0, 1:]
    ids_keep = torch.argsort(noise, dim=1)[:, :keep]
    expected = torch.stack([tokens[i, ids_keep[i]] for i in range(b)])
    cls = (enc.cls_token + enc.pos_embed[:, :1]).detach().expand(b, -1, -1)
    expected = torch.cat([cls, expected], dim=1)
    torch.testing.assert_close(seen["enc0"], expected, atol=1e-5, rtol=1e-5)

    # decoder input: masked positions hold mask_token + pos, visible ones the embedded latent + pos
    mask = out.mask
    dec_in = seen["dec0"]
    pos = model.decoder_pos_embed[0].detach()
    with torch.no_grad():
        emb = model.decoder_embed(seen["latent"])  # [B, 1 + keep, d]
    mtok = model.mask_token[0, 0].detach()
    for i in range(b):
        torch.testing.assert_close(dec_in[i, 0], emb[i, 0] + pos[0])
        for j in range(length):
            if mask[i, j]:
                torch.testing.assert_close(dec_in[i, 1 + j], mtok + pos[1 + j])
            else:
                slot = int((ids_keep[i] == j).nonzero())
                torch.testing.assert_close(dec_in[i, 1 + j], emb[i, 1 + slot] + pos[1 + j])


def test_output_shapes() -> None:
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == (2, 64, 4 * 4 * 3)
    assert out.mask.shape == (2, 64) and out.mask.dtype == torch.bool
    assert torch.equal(out.mask.sum(1), torch.tensor([48, 48]))
    assert model.unpatchify(out.pred).shape == imgs.shape
    out = model(imgs, mask_ratio=0.5)
    assert torch.equal(out.mask.sum(1), torch.tensor([32, 32]))


def test_forward_features_equals_encoder_path_without_masking() -> None:
    model = tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    ids_all = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        full = model.forward_features(imgs)
        ours = model.forward_encoder(imgs, ids_all)
    assert full.shape == (2, 65, 64)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- loss
def _swap_patches(imgs, p, which, generator):
    """Replace the patches selected by bool ``which`` [B, L] with fresh random pixels."""
    from maelab.models.patches import unpatchify

    x = official_patchify(imgs, p).clone()
    x[which] = torch.randn(int(which.sum()), x.shape[-1], generator=generator) * 3 + 1
    h, w = imgs.shape[-2] // p, imgs.shape[-1] // p
    return unpatchify(x, p, (h, w), imgs.shape[1])


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_visible_patch_targets(norm_pix: bool) -> None:
    model = tiny(norm_pix_loss=norm_pix)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32, generator=g)
    pred = torch.randn(2, 64, 48, generator=g)
    mask = masking_from_noise(torch.rand(2, 64, generator=g), 0.75).mask
    base = model.forward_loss(imgs, pred, mask)

    visible_changed = _swap_patches(imgs, 4, ~mask, g)
    assert not torch.equal(visible_changed, imgs)
    assert torch.equal(model.forward_loss(visible_changed, pred, mask), base)

    one = torch.zeros_like(mask)
    j = int(mask[1].nonzero()[0])
    one[1, j] = True
    masked_changed = _swap_patches(imgs, 4, one, g)
    assert not torch.allclose(model.forward_loss(masked_changed, pred, mask), base)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("in_chans,img_size", [(3, 32), (1, 32), (4, (32, 48))])
def test_loss_equals_official_formula(norm_pix: bool, in_chans: int, img_size) -> None:
    torch.manual_seed(1)
    model = tiny(norm_pix_loss=norm_pix, in_chans=in_chans, img_size=img_size)
    hw = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    imgs = torch.randn(2, in_chans, *hw) * 2 + 0.5
    with torch.no_grad():
        out = model(imgs)
    ref = official_loss(imgs, out.pred, out.mask, 4, norm_pix)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-7)
    # forward_loss on its own agrees too, for an arbitrary pred
    pred = torch.randn_like(out.pred)
    torch.testing.assert_close(
        model.forward_loss(imgs, pred, out.mask).double(),
        official_loss(imgs, pred, out.mask, 4, norm_pix),
        rtol=1e-5,
        atol=1e-7,
    )


def test_norm_pix_target_uses_unbiased_variance_and_eps() -> None:
    model = tiny(norm_pix_loss=True)
    imgs = torch.randn(1, 3, 32, 32)
    imgs[..., :4, :4] = 0.25  # a constant patch: var 0 -> target 0 thanks to eps (no NaN)
    t = model.target(imgs)
    x = official_patchify(imgs, 4)
    assert torch.isfinite(t).all()
    assert torch.count_nonzero(t[0, 0]) == 0
    # every non-constant normalized patch has mean 0 and unbiased variance var/(var + eps) ~ 1
    torch.testing.assert_close(t[0, 1:].mean(-1), torch.zeros(63), atol=1e-5, rtol=0)
    v = x[0, 1:].var(-1, unbiased=True)
    torch.testing.assert_close(t[0, 1:].var(-1, unbiased=True), v / (v + 1e-6), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- gradients
def test_every_trainable_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = tiny(norm_pix_loss=True)
    assert not model.encoder.pos_embed.requires_grad
    assert not model.decoder_pos_embed.requires_grad
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.pos_embed", "decoder_pos_embed"}
    model(torch.randn(4, 3, 32, 32)).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_pos_embeds_are_fixed_sincos() -> None:
    model = tiny(img_size=(32, 48))
    torch.testing.assert_close(model.encoder.pos_embed[0], sincos_2d(64, (8, 12), cls_token=True))
    torch.testing.assert_close(model.decoder_pos_embed[0], sincos_2d(32, (8, 12), cls_token=True))


def test_grad_checkpointing_gives_same_loss_and_grads() -> None:
    torch.manual_seed(0)
    a = tiny()
    torch.manual_seed(0)
    b = tiny(grad_checkpointing=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    la, lb = a(imgs, noise=noise).loss, b(imgs, noise=noise).loss
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4, msg=n)


# ---------------------------------------------------------------- init
def test_init_follows_official_rules() -> None:
    torch.manual_seed(0)
    model = create_model(
        "mae_vit_pico_patch4_32",
        embed_dim=192,
        depth=2,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=1,
        decoder_num_heads=4,
    )
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1 * 4 + 2  # qkv, proj, fc1, fc2 per block + decoder_embed, decoder_pred
    for name, m in linears:
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = m.weight.detach()
        assert w.abs().max() <= bound * (1 + 1e-6), name
        assert m.bias is not None and torch.count_nonzero(m.bias) == 0, name
        if w.numel() >= 10_000:
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name
            assert w.abs().max() > 0.95 * bound, name  # uniform fills its range
            assert abs(w.mean().item()) < 0.05 * bound, name

    w = model.encoder.patch_embed.proj.weight.detach().reshape(192, -1)  # linear with fan_in C*p*p = 48
    bound = math.sqrt(6.0 / (48 + 192))
    assert w.abs().max() <= bound * (1 + 1e-6)
    assert w.abs().max() > 0.95 * bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    # the official init leaves the conv bias at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert model.encoder.patch_embed.proj.bias.abs().max() <= 1 / math.sqrt(48)

    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 1 + 1
    for name, m in norms:
        assert m.eps == 1e-6, name
        assert torch.equal(m.weight, torch.ones_like(m.weight)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name

    for tok in (model.encoder.cls_token, model.mask_token):
        t = tok.detach().flatten()
        assert 0.014 < t.std().item() < 0.026  # N(0, 0.02): n = 192 / 128, > 5 sd margins
        assert abs(t.mean().item()) < 0.01


# ---------------------------------------------------------------- inputs and configs
@pytest.mark.parametrize("in_chans,img_size,patch", [(1, 32, 4), (4, 32, 4), (3, (32, 48), 8), (1, (16, 40), 8)])
def test_any_channels_and_non_square_forward_backward(in_chans, img_size, patch) -> None:
    model = tiny(in_chans=in_chans, img_size=img_size, patch_size=patch)
    h, w = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    length = (h // patch) * (w // patch)
    imgs = torch.randn(2, in_chans, h, w)
    out = model(imgs)
    assert out.pred.shape == (2, length, patch * patch * in_chans)
    assert out.mask.shape == (2, length)
    assert torch.equal(out.mask.sum(1), torch.full((2,), length - int(length * 0.25)))
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.shape[1] == in_chans
    assert torch.isfinite(model.decoder_pred.weight.grad).all()
    assert model.forward_features(imgs).shape == (2, 1 + length, 64)
    assert model.unpatchify(out.pred).shape == imgs.shape


@pytest.mark.parametrize("img_size", [30, (32, 30), (34, 32)])
def test_indivisible_image_size_raises_config_error(img_size) -> None:
    with pytest.raises(ConfigError):
        tiny(img_size=img_size)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 32, 28), (2, 3, 28, 32), (3, 32, 32), (2, 4, 32, 32)])
def test_wrong_input_shape_raises(shape) -> None:
    model = tiny()
    with pytest.raises(ValueError):
        model(torch.randn(*shape))
    with pytest.raises(ValueError):
        model.forward_features(torch.randn(*shape))


def test_same_seed_same_noise_same_loss() -> None:
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    torch.manual_seed(7)
    a = tiny()
    torch.manual_seed(7)
    b = tiny()
    oa, ob = a(imgs, noise=noise), b(imgs, noise=noise)
    assert torch.equal(oa.loss, ob.loss) and torch.equal(oa.pred, ob.pred) and torch.equal(oa.mask, ob.mask)
    oc = a(imgs, noise=torch.rand(2, 64))
    assert not torch.equal(oc.mask, oa.mask) and not torch.equal(oc.loss, oa.loss)
    # without explicit noise, the global seed decides the mask
    torch.manual_seed(3)
    m1 = a(imgs).mask
    torch.manual_seed(3)
    assert torch.equal(a(imgs).mask, m1)


@pytest.mark.parametrize("ratio", [None, 0.5, 0.9])
def test_model_mask_equals_masking_from_noise(ratio) -> None:
    model = tiny()
    noise = torch.rand(3, 64)
    out = model(torch.randn(3, 3, 32, 32), mask_ratio=ratio, noise=noise)
    assert torch.equal(out.mask, masking_from_noise(noise, 0.75 if ratio is None else ratio).mask)


def test_model_mask_types() -> None:
    imgs = torch.randn(2, 3, 32, 32)
    grid = tiny(mask_type="grid")(imgs).mask.reshape(2, 8, 8)
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[::2, ::2] = False
    assert torch.equal(grid, expected.expand(2, -1, -1))
    block = tiny(mask_type="block", mask_ratio=0.5)(imgs).mask
    assert torch.equal(block.sum(1), torch.tensor([32, 32]))
    with pytest.raises(ConfigError):
        tiny(mask_type="grid", mask_ratio=0.5)
