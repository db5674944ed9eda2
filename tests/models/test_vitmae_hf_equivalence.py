"""Our MAE vs Hugging Face ``ViTMAEForPreTraining`` with the same weights and the same noise.

HF ViTMAE is an independent implementation of facebookresearch/mae (same noise convention:
``argsort(noise)`` keeps the smallest-noise patches). With our weights copied in by key
mapping, both must produce the same loss, mask and prediction, and the same gradients.
"""

from __future__ import annotations

import pytest
import torch

from maelab.models.masking import masking_from_noise
from maelab.models.pos_embed import sincos_2d
from maelab.models.registry import create_model

transformers = pytest.importorskip("transformers")

D, DEPTH, HEADS, DD, DDEPTH, DHEADS = 64, 2, 2, 32, 1, 2


def make_pair(norm_pix: bool, seed: int = 0):
    torch.manual_seed(seed)
    ours = create_model("mae_vit_pico_patch4_32", depth=DEPTH, embed_dim=D, num_heads=HEADS, decoder_embed_dim=DD,
                        decoder_depth=DDEPTH, decoder_num_heads=DHEADS, norm_pix_loss=norm_pix)
    cfg = transformers.ViTMAEConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, intermediate_size=4 * D, decoder_hidden_size=DD,
        decoder_num_hidden_layers=DDEPTH, decoder_num_attention_heads=DHEADS, decoder_intermediate_size=4 * DD,
        qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, mask_ratio=0.75, norm_pix_loss=norm_pix,
    )
    hf = transformers.ViTMAEForPreTraining(cfg)
    return ours, hf


def _layer_names(hf_keys: set[str]) -> dict[str, str]:
    """Sub-module names of one HF ViTMAE layer, for the installed transformers version."""
    if "vit.layers.0.attention.q_proj.weight" in hf_keys:  # transformers 5.x
        return dict(layers="vit.layers", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                    proj="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2")
    if "vit.encoder.layer.0.attention.attention.query.weight" in hf_keys:  # transformers 4.x
        return dict(layers="vit.encoder.layer", q="attention.attention.query", k="attention.attention.key",
                    v="attention.attention.value", proj="attention.output.dense", fc1="intermediate.dense",
                    fc2="output.dense")
    pytest.skip(f"unknown ViTMAE key layout: {sorted(hf_keys)[:8]}")


def key_map(hf_keys: set[str]) -> dict[str, list[str]]:
    """Our (official) key -> HF key(s); fused qkv maps to three keys, split along dim 0."""
    n = _layer_names(hf_keys)
    out: dict[str, list[str]] = {
        "cls_token": ["vit.embeddings.cls_token"],
        "pos_embed": ["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": ["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": ["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": ["vit.layernorm.weight"],
        "norm.bias": ["vit.layernorm.bias"],
        "mask_token": ["decoder.mask_token"],
        "decoder_pos_embed": ["decoder.decoder_pos_embed"],
    }
    for part in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for t in ("weight", "bias"):
            out[f"{part}.{t}"] = [f"decoder.{part}.{t}"]
    for ours_prefix, hf_prefix, depth in (("blocks", n["layers"], DEPTH),
                                          ("decoder_blocks", "decoder.decoder_layers", DDEPTH)):
        for i in range(depth):
            a, b = f"{ours_prefix}.{i}", f"{hf_prefix}.{i}"
            for t in ("weight", "bias"):
                out[f"{a}.norm1.{t}"] = [f"{b}.layernorm_before.{t}"]
                out[f"{a}.norm2.{t}"] = [f"{b}.layernorm_after.{t}"]
                out[f"{a}.attn.qkv.{t}"] = [f"{b}.{n['q']}.{t}", f"{b}.{n['k']}.{t}", f"{b}.{n['v']}.{t}"]
                out[f"{a}.attn.proj.{t}"] = [f"{b}.{n['proj']}.{t}"]
                out[f"{a}.mlp.fc1.{t}"] = [f"{b}.{n['fc1']}.{t}"]
                out[f"{a}.mlp.fc2.{t}"] = [f"{b}.{n['fc2']}.{t}"]
    return out


def copy_into_hf(ours, hf) -> dict[str, list[str]]:
    hf_keys = set(hf.state_dict())
    mapping = key_map(hf_keys)
    sd = ours.state_dict()
    assert set(sd) == set(mapping), set(sd) ^ set(mapping)
    new = {}
    for k, targets in mapping.items():
        chunks = sd[k].chunk(len(targets), dim=0) if len(targets) > 1 else [sd[k]]
        for t, c in zip(targets, chunks):
            new[t] = c.clone()
    assert set(new) == hf_keys, set(new) ^ hf_keys
    hf.load_state_dict(new, strict=True)
    return mapping


def test_hf_position_embeddings_equal_ours() -> None:
    """HF builds its own 2-D sin-cos tables: an independent reference for ours.

    (ViTMAEForPreTraining's post_init may leave them zero until weights are loaded, so the
    embedding and decoder modules are built and initialized on their own.)
    """
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    cfg = transformers.ViTMAEConfig(image_size=32, patch_size=4, hidden_size=D, num_attention_heads=HEADS,
                                    decoder_hidden_size=DD, decoder_num_attention_heads=DHEADS)
    emb = vit_mae.ViTMAEEmbeddings(cfg)
    emb.initialize_weights()
    dec = vit_mae.ViTMAEDecoder(cfg, num_patches=64)  # initializes its table in __init__
    assert torch.count_nonzero(emb.position_embeddings) > 0 and torch.count_nonzero(dec.decoder_pos_embed) > 0
    torch.testing.assert_close(emb.position_embeddings.detach()[0], sincos_2d(D, 8, cls_token=True),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(dec.decoder_pos_embed.detach()[0], sincos_2d(DD, 8, cls_token=True),
                               atol=1e-6, rtol=0)
    ours, _ = make_pair(norm_pix=False)
    torch.testing.assert_close(ours.encoder.pos_embed.detach(), emb.position_embeddings.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.decoder_pos_embed.detach(), dec.decoder_pos_embed.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_same_weights_same_noise_same_outputs(norm_pix: bool) -> None:
    ours, hf = make_pair(norm_pix)
    mapping = copy_into_hf(ours, hf)
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

    # and so do the gradients of every trainable parameter
    out.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    ours_params = {k.removeprefix("encoder."): p for k, p in ours.named_parameters()}
    compared = 0
    for k, p in ours_params.items():
        if not p.requires_grad:
            continue
        hf_grad = torch.cat([hf_params[t].grad for t in mapping[k]], dim=0)
        torch.testing.assert_close(p.grad, hf_grad, atol=1e-5, rtol=1e-4, msg=k)
        compared += 1
    assert compared == sum(1 for p in ours.parameters() if p.requires_grad)


def test_different_noise_gives_different_outputs_in_both() -> None:
    """Guards the test above against a vacuous pass (e.g. noise being ignored on one side)."""
    ours, hf = make_pair(norm_pix=False, seed=1)
    copy_into_hf(ours, hf)
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
