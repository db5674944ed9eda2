"""Patch masking as pure functions.

Convention (shared with facebookresearch/mae and Hugging Face ViTMAE):

- ``mask`` is a bool tensor [B, L]: **True = masked (hidden from the encoder)**.
- Given ``noise`` [B, L] (uniform in [0, 1) for random masking), the patches with the
  *smallest* noise are kept: ``ids_shuffle = argsort(noise)``,
  ``ids_keep = ids_shuffle[:, :L_keep]``, ``ids_restore = argsort(ids_shuffle)`` (computed as the
  inverse permutation by a scatter, the same values) and
  ``L_keep = int(L * (1 - mask_ratio))``. The same noise gives the same mask as the
  official code.

Every strategy (random, BEiT-style block, grid) is expressed as a noise tensor, so every
mask has exactly ``L_keep`` visible patches per sample and the encoder can gather a dense
[B, L_keep, D] batch.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import numpy as np
import torch


class Masking(NamedTuple):
    """mask [B, L] bool (True = hidden); ids_keep [B, L_keep]; ids_restore [B, L]."""

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: ``int(L * (1 - mask_ratio))`` as in the official code."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def masking_from_noise(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """Keep the ``L_keep`` patches with the smallest noise. noise [B, L] -> Masking."""
    b, length = noise.shape
    keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    # the inverse permutation (the official code's second argsort), written as a scatter: same values, no sort
    ramp = torch.arange(length, device=noise.device).expand(b, -1)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, ramp)
    ids_keep = ids_shuffle[:, :keep]
    # mask[b, ids_shuffle[b, j]] = (j >= keep), written without a gather of a [B, L] ramp
    mask = torch.ones(b, length, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, ids_keep, False)
    return Masking(mask, ids_keep, ids_restore)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Masking:
    """Uniform random masking without replacement (paper default)."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return masking_from_noise(noise, mask_ratio)


def grid_noise(batch_size: int, grid_size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise that keeps the top-left patch of every 2x2 cell (paper's grid-wise sampling, 75%)."""
    gh, gw = grid_size
    rows = torch.arange(gh, device=device)[:, None]
    cols = torch.arange(gw, device=device)[None, :]
    hidden = ((rows % 2) + (cols % 2)) > 0  # [gh, gw]
    # kept patches get noise in [0, 0.5), hidden ones in [0.5, 1): ordering by position.
    order = torch.arange(gh * gw, device=device, dtype=torch.float32) / (2 * gh * gw)
    noise = hidden.reshape(-1).float() * 0.5 + order
    return noise.expand(batch_size, -1).contiguous()


def block_mask(
    grid_size: tuple[int, int],
    num_masked: int,
    rng: random.Random,
    min_block: int = 16,
    max_aspect: float = 1 / 0.3,
) -> torch.Tensor:
    """BEiT-style block-wise mask [rows, cols] bool with about ``num_masked`` True entries.

    Rectangles of random area (>= ``min_block`` patches) and aspect ratio in
    [1/max_aspect, max_aspect] (BEiT: 0.3 to 1/0.3) are added until the target count is reached or no
    rectangle adds anything (BEiT's ``MaskingGenerator``). The grid is a numpy array while the
    rectangles are drawn: on such tiny slices numpy's per-call overhead is a fraction of torch's
    (a 14 x 14 mask is drawn 2-3x faster).
    """
    gh, gw = grid_size
    mask = np.zeros((gh, gw), dtype=bool)
    log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))
    count, failures = 0, 0
    min_block = min(min_block, num_masked)
    while count < num_masked and failures < 20:
        left = num_masked - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, max(min_block, left))
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h <= gh and 0 < w <= gw:
                top, lft = rng.randint(0, gh - h), rng.randint(0, gw - w)
                patch = mask[top : top + h, lft : lft + w]
                new = h * w - int(patch.sum())
                if 0 < new <= left:
                    patch[...] = True
                    added = new
                    break
        if added == 0:
            failures += 1
        count += added
    return torch.from_numpy(mask)


def block_noise(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    rows: range | None = None,
) -> torch.Tensor:
    """Noise [B, L] whose smallest values lie outside BEiT-style blocks.

    Block patches get noise in [1, 2) and the others [0, 1), so ``masking_from_noise``
    hides the blocks first and tops up (or trims) at random to the exact kept count.
    Sample i's blocks come from its own ``random.Random`` seeded by (one draw of ``generator``, i), so
    ``rows`` (say, one rank's rows of the global batch) gives exactly those rows of the whole batch's
    noise, [len(rows), L], at the cost of drawing only their blocks; ``generator`` advances the same.
    """
    gh, gw = grid_size
    length = gh * gw
    num_masked = length - num_kept(length, mask_ratio)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    uniform = torch.rand(batch_size, length, generator=generator)
    rows = range(batch_size) if rows is None else rows
    blocks = torch.stack([block_mask(grid_size, num_masked, random.Random(seed << 32 | i)).reshape(-1) for i in rows])
    noise = _take(uniform, rows) + blocks.float()
    return noise.to(device, non_blocking=True)  # the host does not wait for the GPU (the source is copied out at once)


def make_noise(
    kind: str,
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    rows: range | None = None,
) -> torch.Tensor:
    """Noise [B, L] for a masking strategy: random, block or grid; with ``rows`` only those rows of
    it, [len(rows), L] (``generator`` advances as for the whole batch; block masks draw only those rows)."""
    if kind == "block":
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("block masks are drawn on the CPU: pass a CPU torch.Generator (or none)")
        return block_noise(batch_size, grid_size, mask_ratio, generator, device, rows)
    if kind == "random":
        noise = torch.rand(batch_size, grid_size[0] * grid_size[1], device=device, generator=generator)
    elif kind == "grid":
        noise = grid_noise(batch_size, grid_size, device)
    else:
        raise ValueError(f"unknown mask type {kind!r}: use random, block or grid")
    return noise if rows is None else _take(noise, rows)


def _take(noise: torch.Tensor, rows: range) -> torch.Tensor:
    """``noise[rows]`` as a strided view (no index tensor to copy to the device)."""
    return noise[rows.start : rows.stop : rows.step]
