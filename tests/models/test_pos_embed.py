"""2-D sin-cos position embeddings vs an independent port of facebookresearch/mae util/pos_embed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maelab.models.pos_embed import sincos_2d


# ---- independent numpy port of the official code (square grids) ---------------------------------
def official_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def official_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = official_1d(embed_dim // 2, grid[0])
    emb_w = official_1d(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("embed_dim,grid", [(64, 8), (32, 8), (768, 14), (16, 3), (1024, 16)])
@pytest.mark.parametrize("cls", [True, False])
def test_square_matches_official(embed_dim: int, grid: int, cls: bool) -> None:
    ours = sincos_2d(embed_dim, grid, cls_token=cls)
    ref = torch.from_numpy(official_2d(embed_dim, grid, cls_token=cls)).float()
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape == ((1 if cls else 0) + grid * grid, embed_dim)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # also through the tuple form
    torch.testing.assert_close(sincos_2d(embed_dim, (grid, grid), cls_token=cls), ref, atol=1e-6, rtol=0)


def test_cls_row_is_zero() -> None:
    emb = sincos_2d(32, (3, 5), cls_token=True)
    assert torch.count_nonzero(emb[0]) == 0
    assert torch.equal(emb[1:], sincos_2d(32, (3, 5), cls_token=False))


@pytest.mark.parametrize("gh,gw", [(3, 5), (5, 3), (4, 6), (1, 7), (6, 4)])
def test_non_square_shape_and_distinct_rows(gh: int, gw: int) -> None:
    d = 32
    emb = sincos_2d(d, (gh, gw), cls_token=True)
    assert emb.shape == (1 + gh * gw, d)
    rows = emb[1:]
    dist = torch.cdist(rows.double(), rows.double())
    off_diag = dist + torch.eye(gh * gw, dtype=torch.float64) * 1e9
    assert off_diag.min() > 1e-3  # every patch position gets its own vector


@pytest.mark.parametrize("gh,gw", [(3, 5), (5, 3), (2, 7), (7, 2), (4, 6)])
def test_non_square_rows_match_square_grid_at_same_position(gh: int, gw: int) -> None:
    d = 64
    n = max(gh, gw)
    big = torch.from_numpy(official_2d(d, n)).float()  # [n*n, d], row-major over (row, col)
    small = sincos_2d(d, (gh, gw))
    for r in range(gh):
        for c in range(gw):
            torch.testing.assert_close(small[r * gw + c], big[r * n + c], atol=1e-6, rtol=0)


def test_first_half_encodes_column_second_half_row() -> None:
    d, gh, gw = 16, 3, 4
    emb = sincos_2d(d, (gh, gw)).reshape(gh, gw, d)
    # moving along a row (changing column) leaves the second half unchanged, and vice versa
    assert torch.equal(emb[:, :1, d // 2 :].expand(-1, gw, -1), emb[:, :, d // 2 :])
    assert torch.equal(emb[:1, :, : d // 2].expand(gh, -1, -1), emb[:, :, : d // 2])
    assert not torch.equal(emb[0, 0], emb[0, 1])
    assert not torch.equal(emb[0, 0], emb[1, 0])


def test_matches_transformers_non_square() -> None:
    """HF's builder (which supports H != W) with its documented half swap is a second reference."""
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    build = getattr(vit_mae, "build_2d_sinusoidal_position_embedding", None)
    if build is None:
        pytest.skip("this transformers version has no build_2d_sinusoidal_position_embedding")
    for gh, gw, d in [(3, 5, 32), (6, 2, 64), (8, 8, 48)]:
        ref = build(height=gh, width=gw, embed_dim=d, cls_token=True)
        half = d // 2
        ref = torch.cat([ref[..., half:], ref[..., :half]], dim=-1)  # HF rotates to the official layout
        torch.testing.assert_close(sincos_2d(d, (gh, gw), cls_token=True), ref.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("d", [30, 18, 7])
def test_bad_dim_raises(d: int) -> None:
    with pytest.raises(ValueError):
        sincos_2d(d, 4)
