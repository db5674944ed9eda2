"""Reconstruction images and the paper-style figure (original | masked | reconstruction | + visible).

:func:`reconstruct` is a pure tensor function; :func:`save_reconstruction_grid` draws its
output with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), so no global
backend state is touched, and writes the PNG atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from maelab.io import atomic_write
from maelab.models.patches import patchify, unpatchify
from maelab.models.targets import NORM_PIX_EPS, patch_stats

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
_KEYS = ("original", "masked", "reconstruction", "pasted")
HOLE_GRAY = 0.5


def reconstruct(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> dict[str, torch.Tensor]:
    """Images for a reconstruction figure, all in the normalized model-input space.

    Args:
        imgs: [B, C, H, W] normalized model input.
        pred: [B, L, p*p*C] decoder output in target space (pixels, or per-patch
            normalized pixels when ``norm_pix_loss``).
        mask: [B, L], True (or 1) = masked/hidden patch.
        patch_size: p.
        norm_pix_loss: if True, ``pred`` is un-normalized with the *true* statistics of each
            patch of ``imgs`` (``pred * sqrt(var + 1e-6) + mean``, unbiased var), as in the
            official MAE demo.

    Returns:
        float32 tensors ``original``, ``masked`` (hidden patches set to 0), ``reconstruction``
        (prediction for every patch), ``pasted`` (reconstruction with the visible patches
        replaced by the original), each [B, C, H, W]; plus ``mask`` [B, 1, H, W] float,
        1 on hidden pixels (used to draw the holes).
    """
    if imgs.ndim != 4:
        raise ValueError(f"imgs must be [B, C, H, W], got {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    grid = (h // p, w // p)
    n = grid[0] * grid[1]
    if pred.shape != (b, n, p * p * c):
        raise ValueError(f"pred must be [B, L, p*p*C] = {(b, n, p * p * c)}, got {tuple(pred.shape)}")
    if mask.shape != (b, n):
        raise ValueError(f"mask must be [B, L] = {(b, n)}, got {tuple(mask.shape)}")

    imgs = imgs.float()
    target = patchify(imgs, p)  # [B, L, D]
    pred = pred.to(device=target.device, dtype=torch.float32)
    if norm_pix_loss:
        mean, var = patch_stats(target)
        pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
    hidden = (mask if mask.dtype == torch.bool else mask > 0.5).to(target.device)[..., None]  # [B, L, 1]

    def image(patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, p, grid, c)

    return {
        "original": imgs,
        "masked": image(torch.where(hidden, torch.zeros_like(target), target)),
        "reconstruction": image(pred),
        "pasted": image(torch.where(hidden, pred, target)),
        "mask": unpatchify(hidden.float().expand(b, n, p * p), p, grid, 1),
    }


def default_title(
    norm_pix_loss: bool, mask_ratio: float, epoch: int | None = None, method: str = "mae", note: str | None = None
) -> str:
    """Figure title naming the method, the mask ratio, the epoch and how the prediction was mapped to pixels
    (``note``: the method's own words for that)."""
    head = f"{method.upper()} reconstruction" + (f", mask ratio {mask_ratio:.0%}" if mask_ratio else ", no masking")
    if epoch is not None:
        head += f", epoch {epoch}"
    if note:
        return f"{head}\n{note}"
    if norm_pix_loss:
        return head + "\nnorm_pix_loss: prediction un-normalized with the true patch mean/var"
    return head + "\npixel loss: raw prediction"


def _to_display(
    x: torch.Tensor, mean: Sequence[float] | float | None, std: Sequence[float] | float | None
) -> np.ndarray:
    """[N, C, H, W] normalized -> [N, H, W, 3] or [N, H, W] float in [0, 1] for imshow."""
    c = x.shape[1]
    mean = 0.0 if mean is None else mean
    std = 1.0 if std is None else std
    m = torch.as_tensor(mean, dtype=torch.float32).flatten()
    s = torch.as_tensor(std, dtype=torch.float32).flatten()
    for name, v in (("mean", m), ("std", s)):
        if v.numel() not in (1, c):
            raise ValueError(f"{name} has {v.numel()} values but the images have {c} channels")
    x = (x.float().cpu() * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)).clamp(0.0, 1.0)
    if c == 1:
        x = x[:, 0]
    elif c == 2:
        x = x.mean(dim=1)
    else:
        x = x[:, :3].permute(0, 2, 3, 1)
    return x.numpy()


def _hole_mask(images: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[N, H, W] bool of hidden pixels: from ``images['mask']``, else where ``masked`` is all-zero."""
    if "mask" in images:
        return images["mask"].detach().cpu()[:, 0] > 0.5
    masked, original = images["masked"].detach().cpu(), images["original"].detach().cpu()
    return (masked == 0).all(dim=1) & (original != 0).any(dim=1)


def _atomic_savefig(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render ``fig`` (a matplotlib ``Figure``) to PNG at ``path`` atomically (:func:`maelab.io.atomic_write`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), "the figure")


def save_reconstruction_grid(
    images: Mapping[str, torch.Tensor],
    path: str | Path,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    title: str | None = None,
    max_rows: int = 8,
) -> Path:
    """Write the paper-style PNG: one row per sample, columns original | masked | reconstruction |
    reconstruction + visible.

    Args:
        images: output of :func:`reconstruct` (``original``, ``masked``, ``reconstruction``,
            ``pasted`` [B, C, H, W] normalized; optional ``mask`` [B, 1, H, W]).
        path: PNG path; parent folders are created, the file is replaced atomically.
        mean, std: per-channel normalization (or one value) used to map back to [0, 1];
            None = the images are already in [0, 1].
        title: figure title (see :func:`default_title`).
        max_rows: at most this many samples are drawn.

    C=1 is drawn gray, C=2 as the gray channel mean, C>=3 as RGB of the first 3 channels.
    Hidden patches are drawn gray (0.5) in the masked column.
    """

    missing = [k for k in _KEYS if k not in images]
    if missing:
        raise ValueError(f"images is missing {missing}; pass the output of reconstruct()")
    rows = max(1, min(int(max_rows), images["original"].shape[0]))
    cols = {k: _to_display(images[k].detach()[:rows], mean, std) for k in _KEYS}
    holes = _hole_mask({k: v[:rows] for k, v in images.items()}).numpy()
    masked = cols["masked"]
    masked[holes] = HOLE_GRAY

    return save_image_grid([cols[k] for k in _KEYS], COLUMNS, path, title, fontsize=9)


def save_image_grid(
    panels: Sequence[np.ndarray], columns: Sequence[str], path: str | Path, title: str | None, fontsize: int = 9
) -> Path:
    """One row per sample, one column per panel ([N, H, W] drawn gray in [0, 1], or [N, H, W, 3] RGB), the column
    names on top; written atomically."""
    from matplotlib.figure import Figure

    rows, h, w = panels[0].shape[:3]
    cell = 2.0
    head = 0.3 + (0.2 * (title.count("\n") + 1) if title else 0.0)
    fig = Figure(figsize=(cell * len(panels), cell * rows * h / w + head), layout="constrained")
    axes = fig.subplots(rows, len(panels), squeeze=False)
    for r in range(rows):
        for j, data in enumerate(panels):
            ax = axes[r][j]
            kw = dict(cmap="gray", vmin=0.0, vmax=1.0) if data.ndim == 3 else {}
            ax.imshow(data[r], interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[j], fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=9)
    return _atomic_savefig(fig, path)
