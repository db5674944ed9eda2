"""MaskFeat's figure: the HOG target against the prediction, per patch.

HOG has no pixels to show, and its vectors are L2-normalized per cell, so their length says little. Each patch is
drawn by what HOG encodes, its edge orientation: the hue is the dominant orientation bin (summed over the patch's
cells and colour channels), the brightness how dominant it is (the top bin's share above uniform). Columns:
original | masked | HOG target | HOG prediction (the prediction on hidden patches, the target on visible ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maelab.models.targets import HOG_BINS

COLUMNS = ("original", "masked", "HOG target", "HOG prediction (hidden patches)")


def patch_map(values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Per-patch values [B, L, K] -> images [B, K, H, W] (each patch filled with its values)."""
    b, _, k = values.shape
    gh, gw = grid
    x = values.float().reshape(b, gh, gw, k).permute(0, 3, 1, 2)
    return x.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def orientation_histogram(hog: torch.Tensor, bins: int = HOG_BINS) -> torch.Tensor:
    """HOG vectors [B, L, D] (D = cells x channels x bins, bins last) -> each patch's orientation histogram
    [B, L, bins] (negative predictions count as 0), summing to 1 (uniform where the patch has none)."""
    b, length, d = hog.shape
    per_bin = hog.float().reshape(b, length, d // bins, bins).clamp_min(0).sum(dim=2)
    total = per_bin.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, per_bin / total.clamp_min(1e-12), torch.full_like(per_bin, 1.0 / bins))


def orientation_colors(hog: torch.Tensor, bins: int = HOG_BINS) -> torch.Tensor:
    """HOG vectors [B, L, D] -> RGB [B, L, 3] in [0, 1]: hue = dominant orientation (of 180 degrees), value = how far
    its share is above a uniform histogram's (1 / bins), scaled to [0, 1]."""
    import matplotlib.colors

    hist = orientation_histogram(hog, bins)
    share, top = hist.max(dim=-1)
    strength = ((share - 1.0 / bins) / (1.0 - 1.0 / bins)).clamp(0, 1)
    hsv = torch.stack([top.float() / bins, torch.ones_like(strength), strength], dim=-1)
    return torch.from_numpy(matplotlib.colors.hsv_to_rgb(hsv.cpu().numpy())).float()


def hog_images(
    imgs: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> dict[str, torch.Tensor]:
    """The figure's images: ``original`` [B, C, H, W] (normalized input), ``target`` and ``prediction`` RGB
    [B, 3, H, W] in [0, 1] (:func:`orientation_colors`; the prediction on hidden patches, the target on visible
    ones), ``mask`` [B, 1, H, W] (1 = hidden). ``target`` / ``pred`` [B, L, D]; ``mask`` [B, L]."""
    grid = (imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size)
    target_rgb, pred_rgb = orientation_colors(target), orientation_colors(pred)
    hidden = mask.bool().cpu()
    shown = torch.where(hidden[..., None], pred_rgb, target_rgb)
    return {
        "original": imgs.float(),
        "target": patch_map(target_rgb, grid, patch_size),
        "prediction": patch_map(shown, grid, patch_size),
        "mask": patch_map(hidden.float()[..., None], grid, patch_size),
    }


def save_figure(
    images: Mapping[str, torch.Tensor],
    path: str | Path,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    title: str | None = None,
) -> Path:
    """A method's figure (:attr:`maelab.methods.Method.figure`'s images): the HOG grid for HOG images, else the
    reconstruction grid."""
    from maelab.viz.reconstruction import save_reconstruction_grid

    if "prediction" in images:
        return save_hog_grid(images, path, mean, std, title)
    return save_reconstruction_grid(images, path, mean, std, title)


def save_hog_grid(
    images: Mapping[str, torch.Tensor],
    path: str | Path,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    title: str | None = None,
    max_rows: int = 8,
) -> Path:
    """Write the MaskFeat figure (one row per sample, the :data:`COLUMNS`) as a PNG, atomically."""
    from maelab.viz.reconstruction import HOLE_GRAY, _to_display, save_image_grid

    rows = max(1, min(int(max_rows), images["original"].shape[0]))
    original = _to_display(images["original"][:rows], mean, std)
    masked = original.copy()
    masked[images["mask"][:rows, 0].cpu().numpy() > 0.5] = HOLE_GRAY
    panels: tuple[Any, ...] = (
        original,
        masked,
        images["target"][:rows].permute(0, 2, 3, 1).cpu().numpy(),
        images["prediction"][:rows].permute(0, 2, 3, 1).cpu().numpy(),
    )
    return save_image_grid(panels, COLUMNS, path, title, fontsize=8)
