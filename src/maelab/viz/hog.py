"""MaskFeat's figure: the HOG target against the prediction, as per-patch heat maps.

HOG has no pixels to show, so each patch is drawn by the energy of its HOG vector (the L2 norm over its cells,
channels and orientation bins): bright where the image has strong edges. Columns: original | masked | HOG
target | HOG prediction (hidden patches; visible ones are the target's, outlined by the mask) | the dominant
orientation of the prediction (hue) weighted by its energy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maelab.models.targets import HOG_BINS

COLUMNS = ("original", "masked", "HOG target (energy)", "HOG prediction (energy)", "predicted orientation")


def patch_map(values: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Per-patch values [B, L] -> images [B, 1, H, W] (each patch filled with its value)."""
    b = values.shape[0]
    gh, gw = grid
    x = values.float().reshape(b, 1, gh, gw)
    return x.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def hog_energy(hog: torch.Tensor) -> torch.Tensor:
    """HOG vectors [B, L, D] -> their L2 norms [B, L]."""
    return hog.float().norm(dim=-1)


def dominant_orientation(hog: torch.Tensor, bins: int = HOG_BINS) -> torch.Tensor:
    """HOG vectors [B, L, D] (D = cells x channels x bins, bins last) -> the bin with the most mass per patch,
    as a fraction of 180 degrees [B, L] in [0, 1)."""
    b, length, d = hog.shape
    per_bin = hog.float().reshape(b, length, d // bins, bins).clamp_min(0).sum(dim=2)
    return per_bin.argmax(dim=-1).float() / bins


def hog_images(
    imgs: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> dict[str, torch.Tensor]:
    """The figure's images: ``original`` [B, C, H, W] (normalized input), ``target`` / ``prediction`` energies and
    ``orientation`` [B, 1, H, W] in [0, 1] (each image scaled by its target's largest energy), ``mask``
    [B, 1, H, W] (1 = hidden). ``target``/``pred`` [B, L, D]; ``mask`` [B, L]."""
    grid = (imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size)
    hidden = mask.float()
    t_energy, p_energy = hog_energy(target), hog_energy(pred)
    scale = t_energy.amax(dim=1, keepdim=True).clamp_min(1e-6)
    shown = torch.where(hidden.bool(), p_energy, t_energy)  # prediction where hidden, the target where visible
    return {
        "original": imgs.float(),
        "target": patch_map((t_energy / scale).clamp(0, 1), grid, patch_size),
        "prediction": patch_map((shown / scale).clamp(0, 1), grid, patch_size),
        "orientation": patch_map(dominant_orientation(pred), grid, patch_size),
        "strength": patch_map((p_energy / scale).clamp(0, 1), grid, patch_size),
        "mask": patch_map(hidden, grid, patch_size),
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
    import matplotlib.colors
    from matplotlib.figure import Figure

    from maelab.viz.reconstruction import HOLE_GRAY, _atomic_savefig, _to_display

    rows = max(1, min(int(max_rows), images["original"].shape[0]))
    original = _to_display(images["original"][:rows], mean, std)
    masked = original.copy()
    holes = images["mask"][:rows, 0].cpu().numpy() > 0.5
    masked[holes] = HOLE_GRAY
    hsv = torch.stack(
        [images["orientation"][:rows, 0], torch.ones_like(images["strength"][:rows, 0]), images["strength"][:rows, 0]],
        dim=-1,
    )
    orientation = matplotlib.colors.hsv_to_rgb(hsv.cpu().numpy())
    h, w = images["original"].shape[-2:]
    cell = 2.0
    head = 0.3 + (0.2 * (title.count("\n") + 1) if title else 0.0)
    fig = Figure(figsize=(cell * len(COLUMNS), cell * rows * h / w + head), layout="constrained")
    axes = fig.subplots(rows, len(COLUMNS), squeeze=False)
    panels: tuple[tuple[Any, dict[str, Any]], ...] = (
        (original, {}),
        (masked, {}),
        (images["target"][:rows, 0].cpu().numpy(), {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}),
        (images["prediction"][:rows, 0].cpu().numpy(), {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}),
        (orientation, {}),
    )
    for r in range(rows):
        for j, (data, kw) in enumerate(panels):
            ax = axes[r][j]
            cmap = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if data.ndim == 3 and j < 2 else kw
            ax.imshow(data[r], interpolation="nearest", **cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _atomic_savefig(fig, path)
