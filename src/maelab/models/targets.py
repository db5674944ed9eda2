"""Reconstruction targets and the masked MSE loss (official facebookresearch/mae math)."""

from __future__ import annotations

import torch

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
