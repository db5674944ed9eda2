"""patchify / unpatchify: exact round trip, official layout, any channel count, H != W."""

from __future__ import annotations

import pytest
import torch

from maelab.models.patches import patchify, unpatchify


def official_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """facebookresearch/mae ``MaskedAutoencoderViT.patchify``, generalized to C channels and H != W."""
    n, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("hw", [(24, 40), (40, 24), (32, 32)])
def test_round_trip_exact(channels: int, hw: tuple[int, int]) -> None:
    p = 8
    g = torch.Generator().manual_seed(channels * 100 + hw[0])
    imgs = torch.randn(2, channels, *hw, generator=g)
    x = patchify(imgs, p)
    assert x.shape == (2, (hw[0] // p) * (hw[1] // p), p * p * channels)
    back = unpatchify(x, p, (hw[0] // p, hw[1] // p), channels)
    assert torch.equal(back, imgs)
    # the other direction too: any patch tensor is a valid image
    y = torch.randn(2, x.shape[1], x.shape[2], generator=g)
    assert torch.equal(patchify(unpatchify(y, p, (hw[0] // p, hw[1] // p), channels), p), y)


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_matches_official_layout(channels: int) -> None:
    imgs = torch.randn(3, channels, 24, 40, generator=torch.Generator().manual_seed(channels))
    assert torch.equal(patchify(imgs, 8), official_patchify(imgs, 8))


def test_patch_contents_by_position() -> None:
    """Patch l = r * gw + c holds pixels [r*p:(r+1)*p, c*p:(c+1)*p], ordered (row, col, channel)."""
    p, c_in = 4, 3
    imgs = torch.arange(2 * c_in * 12 * 20, dtype=torch.float32).reshape(2, c_in, 12, 20)
    x = patchify(imgs, p)
    gh, gw = 3, 5
    for b in range(2):
        for r in range(gh):
            for c in range(gw):
                block = imgs[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p]  # [C, p, p]
                assert torch.equal(x[b, r * gw + c], block.permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("hw", [(24, 41), (25, 40), (30, 30)])
def test_not_divisible_raises(hw: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 3, *hw), 8)


def test_unpatchify_bad_shape_raises() -> None:
    x = torch.zeros(1, 15, 8 * 8 * 3)
    with pytest.raises(ValueError):
        unpatchify(x, 8, (3, 4), 3)  # 12 patches, not 15
    with pytest.raises(ValueError):
        unpatchify(x, 8, (3, 5), 4)  # wrong channel count
