"""Patchify / unpatchify, for any channel count and non-square images.

Patch vectors use the official facebookresearch/mae layout: the ``p*p*C`` values of a
patch are ordered (row-in-patch, col-in-patch, channel), i.e. channel-last, and patches
are ordered row-major over the (H/p, W/p) grid.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] with L = (H/p) * (W/p)."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W] for a (rows, cols) patch grid."""
    b, n, d = x.shape
    p = patch_size
    gh, gw = grid_size
    if n != gh * gw or d != p * p * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into grid {grid_size}, patch {p}, {channels} channels")
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)
