"""Reconstruction targets and the masked MSE loss (official facebookresearch/mae math).

Targets: pixels, per-patch normalized pixels (MAE ``norm_pix_loss``), and HOG features
(MaskFeat, Wei et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

NORM_PIX_EPS = 1e-6


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and unbiased variance. patches [B, L, D] -> ([B, L, 1], [B, L, 1])."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as torch.var / the official code
    return mean, var


def pixel_target(patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Target [B, L, D]: the patch pixels, or per-patch normalized ``(x - mean) / sqrt(var + 1e-6)``."""
    if not norm_pix:
        return patches
    mean, var = patch_stats(patches)
    return (patches - mean) / (var + NORM_PIX_EPS) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE. pred/target [B, L, D], mask [B, L] bool."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


HOG_BINS = 9
HOG_CELL = 8


def hog_dim(patch_size: int, channels: int, nbins: int = HOG_BINS, cell: int = HOG_CELL) -> int:
    """Length of one patch's HOG target: channels x (cells per patch) x bins."""
    cell = min(cell, patch_size)
    return channels * (patch_size // cell) ** 2 * nbins


def _gaussian_window(size: int, device: torch.device) -> torch.Tensor:
    """[size, size] Gaussian (std size / 2) that sums to 1, as MaskFeat weights each patch."""
    n = torch.arange(size, dtype=torch.float32, device=device)
    n = (n - n.mean()) / (size / 2)
    w = torch.exp(-0.5 * n**2)
    w2 = w[:, None] * w[None, :]
    return w2 / w2.sum()


@torch.no_grad()
def hog_target(
    imgs: torch.Tensor, patch_size: int, nbins: int = HOG_BINS, cell: int = HOG_CELL, gaussian: bool = True
) -> torch.Tensor:
    """MaskFeat-style HOG target. imgs [B, C, H, W] -> [B, L, C * (p/cell)^2 * nbins].

    Per channel: Sobel gradients (reflect padding), unsigned orientation in ``nbins`` bins
    (hard assignment), magnitudes weighted by a Gaussian window the size of a patch, summed
    over ``cell x cell`` cells and L2-normalized over the bins of each cell. A patch's vector
    lists its cells row-major, each as (channel, bin). ``cell`` shrinks to the patch size for
    small patches.
    """
    cell = min(cell, patch_size)
    if patch_size % cell:
        raise ValueError(f"patch size {patch_size} is not a multiple of the HOG cell {cell}")
    # fp32 throughout: under bf16 autocast the Sobel conv would round gradients and misassign orientation bins
    with torch.autocast(device_type=imgs.device.type, enabled=False):
        return _hog(imgs.float(), patch_size, nbins, cell, gaussian)


def _hog(imgs: torch.Tensor, patch_size: int, nbins: int, cell: int, gaussian: bool) -> torch.Tensor:
    b, c, h, w = imgs.shape
    x = F.pad(imgs, (1, 1, 1, 1), mode="reflect")
    # built on the host and copied without waiting (a tensor made directly on CUDA syncs the host)
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]).to(imgs.device, non_blocking=True)
    kx = sobel.expand(c, 1, 3, 3)
    ky = sobel.t().expand(c, 1, 3, 3)
    gx = F.conv2d(x, kx, groups=c)
    gy = F.conv2d(x, ky, groups=c)
    magnitude = torch.sqrt(gx**2 + gy**2)  # [B, C, H, W]
    # angle in (-pi, pi] -> (-nbins, nbins]; modulo nbins folds opposite directions together
    bins = torch.floor(torch.atan2(gx, gy) / math.pi * nbins).long() % nbins
    if gaussian:
        magnitude = magnitude * _gaussian_window(patch_size, imgs.device).repeat(h // patch_size, w // patch_size)
    hist = torch.zeros(b, c, nbins, h, w, device=imgs.device)
    hist.scatter_add_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
    hist = F.avg_pool2d(hist.flatten(1, 2), cell) * cell * cell  # sum over cells: [B, C*nbins, H/cell, W/cell]
    hist = F.normalize(hist.view(b, c, nbins, h // cell, w // cell), p=2, dim=2)
    k = patch_size // cell  # cells per patch side
    gh, gw = h // patch_size, w // patch_size
    hist = hist.view(b, c, nbins, gh, k, gw, k)
    # -> [B, gh, gw, k (cell row), k (cell col), C, nbins]
    hist = hist.permute(0, 3, 5, 4, 6, 1, 2)
    return hist.reshape(b, gh * gw, k * k * c * nbins)


class Target(NamedTuple):
    """A reconstruction target: what the decoder regresses for each patch."""

    compute: Callable[[torch.Tensor, int, bool], torch.Tensor]
    """(imgs [B, C, H, W], patch size p, norm_pix) -> target [B, L, D]."""
    dim: Callable[[int, int], int]
    """(patch size p, channels C) -> D."""


def _pixels(imgs: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    from maelab.models.patches import patchify

    return pixel_target(patchify(imgs, patch_size), norm_pix)


TARGETS: dict[str, Target] = {
    "pixels": Target(_pixels, lambda p, c: p * p * c),
    "hog": Target(lambda imgs, p, norm_pix: hog_target(imgs, p), hog_dim),
}
"""The targets by name (``model_args.target``; ``maelab.config.TARGETS`` lists the same names)."""
