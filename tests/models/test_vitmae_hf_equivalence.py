"""Our MAE vs Hugging Face ``ViTMAEForPreTraining`` with the same weights and the same noise.

HF ViTMAE is an independent implementation of facebookresearch/mae (same noise convention:
``argsort(noise)`` keeps the smallest-noise patches). With our weights exported by
``maelab.models.hf.save_hf`` (what ``maelab export --format hf`` writes) and loaded by
``from_pretrained``, both must produce the same loss, mask and prediction, and the same gradients.
"""

from __future__ import annotations

import pytest
import torch

from maelab.models.hf import from_hf_state_dict, save_hf
from maelab.models.masking import masking_from_noise
from maelab.models.pos_embed import sincos_2d
from maelab.models.registry import create_model

transformers = pytest.importorskip("transformers")

D, DEPTH, HEADS, DD, DDEPTH, DHEADS = 64, 2, 2, 32, 1, 2


def make_pair(norm_pix: bool, tmp_path, seed: int = 0):
    """Our MAE and the HF model ``from_pretrained`` loads from our ``save_hf`` export of it."""
    torch.manual_seed(seed)
    ours = create_model(
        "mae_vit_pico_patch4_32",
        depth=DEPTH,
        embed_dim=D,
        num_heads=HEADS,
        decoder_embed_dim=DD,
        decoder_depth=DDEPTH,
        decoder_num_heads=DHEADS,
        norm_pix_loss=norm_pix,
    )
    hf = transformers.ViTMAEForPreTraining.from_pretrained(save_hf(ours, tmp_path / "hf"))
    return ours, hf


def test_exported_config_is_the_official_architecture(tmp_path) -> None:
    """What config.json tells transformers: exact GELU, qkv bias, LayerNorm eps 1e-6, no dropout."""
    _, hf = make_pair(norm_pix=True, tmp_path=tmp_path)
    c = hf.config
    assert (c.hidden_act, c.qkv_bias, c.layer_norm_eps, c.hidden_dropout_prob, c.attention_probs_dropout_prob) == (
        "gelu",
        True,
        1e-6,
        0.0,
        0.0,
    )
    assert (
        c.image_size,
        c.patch_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.decoder_hidden_size,
        c.decoder_num_hidden_layers,
        c.decoder_num_attention_heads,
        c.decoder_intermediate_size,
        c.mask_ratio,
        c.norm_pix_loss,
    ) == (32, 4, D, DEPTH, HEADS, 4 * D, DD, DDEPTH, DHEADS, 4 * DD, 0.75, True)


def test_hf_position_embeddings_equal_ours() -> None:
    """HF builds its own 2-D sin-cos tables: an independent reference for ours.

    (ViTMAEForPreTraining's post_init may leave them zero until weights are loaded, so the
    embedding and decoder modules are built and initialized on their own.)
    """
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    cfg = transformers.ViTMAEConfig(
        image_size=32,
        patch_size=4,
        hidden_size=D,
        num_attention_heads=HEADS,
        decoder_hidden_size=DD,
        decoder_num_attention_heads=DHEADS,
    )
    emb = vit_mae.ViTMAEEmbeddings(cfg)
    emb.initialize_weights()
    dec = vit_mae.ViTMAEDecoder(cfg, num_patches=64)  # initializes its table in __init__
    assert torch.count_nonzero(emb.position_embeddings) > 0 and torch.count_nonzero(dec.decoder_pos_embed) > 0
    torch.testing.assert_close(emb.position_embeddings.detach()[0], sincos_2d(D, 8, cls_token=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(dec.decoder_pos_embed.detach()[0], sincos_2d(DD, 8, cls_token=True), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    ours = create_model(
        "mae_vit_pico_patch4_32", embed_dim=D, num_heads=HEADS, decoder_embed_dim=DD, decoder_num_heads=DHEADS
    )
    torch.testing.assert_close(ours.encoder.pos_embed.detach(), emb.position_embeddings.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.decoder_pos_embed.detach(), dec.decoder_pos_embed.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_same_weights_same_noise_same_outputs(norm_pix: bool, tmp_path) -> None:
    ours, hf = make_pair(norm_pix, tmp_path)
    ours.eval()
    hf.eval()
    g = torch.Generator().manual_seed(42)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.rand(3, 64, generator=g)

    out = ours(imgs, noise=noise)
    ref = hf(pixel_values=imgs, noise=noise)

    assert torch.equal(out.mask, ref.mask.bool())
    assert torch.equal(masking_from_noise(noise, 0.75).ids_restore, ref.ids_restore)
    assert out.pred.shape == ref.logits.shape
    torch.testing.assert_close(out.pred, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)

    # encoder latents agree too (visible tokens + cls, after the final norm)
    with torch.no_grad():
        latent = ours.forward_encoder(imgs, masking_from_noise(noise, 0.75).ids_keep)
        hf_latent = hf.vit(pixel_values=imgs, noise=noise).last_hidden_state
    torch.testing.assert_close(latent, hf_latent, atol=1e-5, rtol=1e-5)

    # and so do the gradients of every trainable parameter (HF's named back to ours by the library mapping)
    out.loss.backward()
    ref.loss.backward()
    hf_grads = from_hf_state_dict({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    ours_grads = {k.removeprefix("encoder."): p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() <= hf_grads.keys()  # (transformers 5 also trains the position embeddings we fix)
    for k, grad in ours_grads.items():
        torch.testing.assert_close(grad, hf_grads[k], atol=1e-5, rtol=1e-4, msg=k)


def test_different_noise_gives_different_outputs_in_both(tmp_path) -> None:
    """Guards the test above against a vacuous pass (e.g. noise being ignored on one side)."""
    ours, hf = make_pair(norm_pix=False, tmp_path=tmp_path, seed=1)
    imgs = torch.randn(2, 3, 32, 32)
    n1, n2 = torch.rand(2, 64), torch.rand(2, 64)
    with torch.no_grad():
        a1, a2 = ours(imgs, noise=n1), ours(imgs, noise=n2)
        b1, b2 = hf(pixel_values=imgs, noise=n1), hf(pixel_values=imgs, noise=n2)
    assert not torch.equal(a1.mask, a2.mask)
    assert torch.equal(a2.mask, b2.mask.bool())
    torch.testing.assert_close(a2.loss, b2.loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a1.loss, a2.loss)
    torch.testing.assert_close(a1.loss, b1.loss, atol=1e-5, rtol=1e-5)
