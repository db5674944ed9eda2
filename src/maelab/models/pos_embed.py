"""Fixed 2-D sin-cos position embeddings for any (rows, cols) patch grid.

Bit-compatible with facebookresearch/mae ``get_2d_sincos_pos_embed`` for square grids:
the first half of the channels encodes the column (x) coordinate and the second half the
row (y) coordinate (the official code builds ``meshgrid(grid_w, grid_h)``), each half as
``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 1 / 10000 ** (arange(D/4) / (D/4))``.
"""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, embed_dim] (sin half, then cos half), computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int] | int, cls_token: bool = False) -> torch.Tensor:
    """[(1 if cls_token) + rows*cols, embed_dim] float32; the cls position is all zeros."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(gh, dtype=torch.float64)
    cols = torch.arange(gw, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")  # [gh, gw] each, row-major
    emb = torch.cat([sincos_1d(embed_dim // 2, grid_x), sincos_1d(embed_dim // 2, grid_y)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
