"""Masked patches are never seen: in MAE they are dropped, in the ablation they are replaced."""

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS

import maelab
from maelab.models.masking import masking_from_noise
from maelab.models.patches import patchify, unpatchify


def _model(**kw):
    torch.manual_seed(0)
    return maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS, **kw).eval()


def _perturb_masked_patches(imgs, mask, patch):
    patches = patchify(imgs, patch)
    patches = torch.where(mask.unsqueeze(-1), torch.randn_like(patches) * 5, patches)
    return unpatchify(patches, patch, (imgs.shape[-2] // patch, imgs.shape[-1] // patch), imgs.shape[1])


@pytest.mark.parametrize("in_encoder", [False, True])
def test_masked_pixels_do_not_change_the_prediction(in_encoder):
    model = _model(mask_token_in_encoder=in_encoder)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    mask = masking_from_noise(noise, 0.75).mask
    other = _perturb_masked_patches(imgs, mask, 4)
    assert not torch.allclose(other, imgs)
    with torch.no_grad():
        a, b = model(imgs, noise=noise), model(other, noise=noise)
    torch.testing.assert_close(a.pred, b.pred)
    assert not torch.allclose(a.loss, b.loss)  # the targets of masked patches did change


def test_mask_token_in_encoder_runs_all_tokens_and_trains():
    model = _model(mask_token_in_encoder=True).train()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen == [1 + 64]
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.mask_token.requires_grad  # the decoder adds no mask tokens in this ablation
    assert "encoder_mask_token" in model.no_weight_decay()


def test_mask_token_in_encoder_state_dict_round_trip():
    model = _model(mask_token_in_encoder=True)
    sd = model.state_dict()
    assert "encoder_mask_token" in sd and "encoder.encoder_mask_token" not in sd
    again = _model(mask_token_in_encoder=True)
    again.load_state_dict(sd, strict=True)
    torch.testing.assert_close(again.encoder_mask_token, model.encoder_mask_token)
