"""Batched RandomResizedCrop + bicubic resize + flip + normalize of uint8 images, with plain torch ops.

The per-sample CPU pipeline (:func:`~maelab.data.transforms.pretrain_transform`) crops, resizes
and flips one image at a time in DataLoader workers. Here a whole batch is done in a few
tensor ops on the images' device (used by :class:`~maelab.data.loaders.GPUBatchLoader` for a
GPU-resident set, and by :class:`~maelab.data.jpeg_gpu.JPEGDecodeLoader` for the resize):

1. :func:`random_resized_crop_params`: torchvision's ``RandomResizedCrop`` parameter
   sampling (10 attempts, center-crop fallback), vectorized over the batch;
2. :func:`batched_resized_crop`: crop + bicubic resize + flip + ``/255`` + normalize of
   every sample in one call.

Everything is plain torch, so it runs (and is tested) on CPU too. Differences from the CPU
path:

* crop parameters: the same distribution, drawn from a different random stream;
* ``antialias=True`` uses the same separable, PIL-style bicubic kernel as torchvision's
  ``resize(antialias=True)`` (Keys a=-0.5, support widened by the downscale factor, weights
  renormalized inside the crop), so for float images it matches
  ``F.resized_crop(..., antialias=True)`` to float rounding. The CPU path resizes *uint8*
  images with torchvision's native uint8 kernel (integer weights, rounding after each of
  its two passes); this module keeps float values, a difference of about one uint8 level;
* ``antialias=False`` uses ``F.grid_sample(mode='bicubic')`` (Keys a=-0.75, like
  ``F.resized_crop(..., antialias=False)``), which does not low-pass filter when it
  downscales, and which reads the real neighbours of the crop where torchvision crops first
  and replicates the crop's edge pixels (see :func:`batched_resized_crop`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from maelab.data.transforms import Size, pair_size

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
NUM_ATTEMPTS = 10
"""RandomResizedCrop tries this many (area, aspect) draws before the center-crop fallback."""

__all__ = ["DEFAULT_RATIO", "antialiased_resized_crop", "batched_resized_crop", "random_resized_crop_params"]


# ---------------------------------------------------------------------------- crop parameters
def random_resized_crop_params(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes for a ``height`` x ``width`` image: int64 [n, 4] (top, left, h, w).

    torchvision's ``RandomResizedCrop`` parameter sampling, vectorized: for each sample, up
    to 10 attempts draw an area fraction uniform in ``scale`` and a log aspect ratio uniform
    in ``log(ratio)``; ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first
    attempt with ``0 < w <= width`` and ``0 < h <= height`` is kept, with top and left
    uniform integers. Samples with no accepted attempt get torchvision's fallback: the
    center crop with the aspect ratio clamped to ``ratio``.

    All randomness comes from ``generator`` (on its device; the CPU default generator when
    None); the whole call draws a fixed number of values, so a generator state gives one
    answer. Values are computed in float32 (torchvision uses Python floats): the two differ
    only when a rounding lands within float32 precision of a half-integer.
    """
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"invalid scale {scale}: need 0 < min <= max")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"invalid ratio {ratio}: need 0 < min <= max")
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((2, NUM_ATTEMPTS, n), generator=generator, device=device)
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [attempts, n]
    first = ok.to(torch.uint8).argmax(0, keepdim=True)  # first accepted attempt (0 if none)
    accepted = ok.any(0)
    w = w.gather(0, first)[0]
    h = h.gather(0, first)[0]

    # torchvision's fallback: the center crop, aspect ratio clamped to the range
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(accepted, w, torch.full_like(w, fw))
    h = torch.where(accepted, h, torch.full_like(h, fh))

    v = torch.rand((2, n), generator=generator, device=device)
    top = torch.minimum(torch.floor(v[0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(v[1] * (width - w + 1)), width - w)
    top = torch.where(accepted, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(accepted, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


# ---------------------------------------------------------------------------- crop + resize
def _pil_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a=-0.5: PIL and torch's antialiased bicubic)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _aa_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Per-sample resampling matrices [B, out_size, in_size] of an antialiased bicubic resize
    of the crop ``[start, start + length)`` (one axis) to ``out_size`` pixels.

    The same weights as torch's ``interpolate(mode='bicubic', antialias=True,
    align_corners=False)`` (``_compute_weights_aa`` in ATen's UpSampleKernel.cpp): output
    pixel i is centered at ``c = scale * (i + 0.5)`` in crop coordinates
    (``scale = length / out_size``), the support is ``2 * max(scale, 1)``, the kernel is
    stretched by ``max(scale, 1)``, taps outside the crop are dropped and the remaining
    weights renormalized to sum 1.
    """
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size  # [B, 1, 1]
    stretch = torch.clamp(scale, min=1.0)
    support = 2.0 * stretch
    i = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
    center = scale * (i + 0.5)  # [B, out, 1]
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length)
    j = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :] - start  # crop coords
    taps = (j >= lo) & (j < hi)
    wts = _pil_cubic((j - center + 0.5) / stretch) * taps
    total = wts.sum(-1, keepdim=True)
    return wts / torch.where(total == 0, torch.ones_like(total), total)


def _normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """[0, 255] floats -> clamp -> /255 -> (x - mean) / std, in place."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return x.clamp_(0.0, 255.0).div_(255.0).sub_(mean_t).div_(std_t)


def antialiased_resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, out_size: Size, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Crops ``boxes`` [B, 4] (top, left, h, w) of ``images`` [B, C, H, W] resized to ``out_size`` with the
    weights of torchvision's antialiased bicubic ``resized_crop`` (separable per-sample matrices, two batched
    matmuls) and mirrored where ``flip`` [B] (bool) -> float32 [B, C, oh, ow], not clamped."""
    _, _, height, width = images.shape
    oh, ow = pair_size(out_size)
    top, left, h, w = boxes.to(device=images.device, dtype=torch.float32).unbind(1)
    wy = _aa_weights(top, h, height, oh)  # [B, oh, H]
    wx = _aa_weights(left, w, width, ow)  # [B, ow, W]
    if flip is not None:
        wx = torch.where(flip.to(images.device)[:, None, None], wx.flip(1), wx)
    # horizontal pass first, like torch's separable kernel (only float rounding depends on it)
    return torch.matmul(wy[:, None], torch.matmul(images.to(torch.float32), wx.transpose(1, 2)[:, None]))


def batched_resized_crop(
    images: torch.Tensor,
    boxes: torch.Tensor,
    out_size: Size,
    flip: torch.Tensor | None = None,
    mean: Sequence[float] | torch.Tensor = (0.0,),
    std: Sequence[float] | torch.Tensor = (1.0,),
    antialias: bool = False,
) -> torch.Tensor:
    """Crop ``boxes`` out of ``images``, resize to ``out_size`` (bicubic), flip, normalize.

    Args:
        images: uint8 [B, C, H, W], or float with values in [0, 255].
        boxes: [B, 4] (top, left, h, w) in pixels (int or float), e.g. from
            :func:`random_resized_crop_params`.
        out_size: (oh, ow) or an int.
        flip: bool [B]: mirror these samples horizontally (after the crop); None: none.
        mean, std: per-channel normalization of the [0, 1] values (length C, or 1).
        antialias: False: one ``F.grid_sample(mode='bicubic', padding_mode='border',
            align_corners=False)`` over per-sample affine grids (Keys a=-0.75, the kernel of
            torchvision's ``resized_crop(..., antialias=False)``). Output pixel j samples
            the input at ``left + (j + 0.5) * w / ow - 0.5``, exactly torchvision's sampling
            positions, so results agree except near the crop's edges when the crop is
            inside the image: torchvision crops first and replicates the crop's border,
            grid_sample reads the real neighbouring pixels (replicating only at the image
            border). No low-pass filtering when downscaling (fine for crops that are
            upscaled, as for CIFAR-sized data; see the module docstring).
            True: separable per-sample weight matrices (two batched matmuls), exactly the
            weights of torchvision's ``resized_crop(..., antialias=True)`` / the CPU
            ``pretrain_transform`` (PIL-style bicubic, a=-0.5, antialiased when
            downscaling, taps outside the crop dropped and weights renormalized).

    Returns:
        float32 [B, C, oh, ow]: the resampled values clamped to [0, 255] (bicubic overshoots;
        torchvision clamps its uint8 results too), divided by 255 and normalized.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    bsz, _, height, width = images.shape
    oh, ow = pair_size(out_size)
    x = images.to(torch.float32)
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(1)
    if antialias:
        out = antialiased_resized_crop(x, boxes, (oh, ow), flip)
    else:
        # output normalized x_o in [-1, 1] -> input normalized (2 * left + (x_o + 1) * w) / W - 1
        sx, tx = w / width, (2.0 * left + w) / width - 1.0
        sy, ty = h / height, (2.0 * top + h) / height - 1.0
        if flip is not None:
            sx = torch.where(flip.to(images.device), -sx, sx)
        zero = torch.zeros_like(sx)
        theta = torch.stack([sx, zero, tx, zero, sy, ty], dim=1).view(bsz, 2, 3)
        grid = F.affine_grid(theta, [bsz, x.shape[1], oh, ow], align_corners=False)
        out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return _normalize(out.contiguous(), mean, std)
