"""Procedural, labeled shapes: a dataset that needs no files and no network.

Each image is a textured background (gradient, radial gradient, smooth noise or faint
stripes, plus pixel noise) with one foreground shape whose *kind* is the class (disk,
square, triangle, ring, cross, ...; 20 kinds). Position, size, rotation and colours are
random; the foreground contrasts with the background (one dark, the other light), so the
class is carried by shape, which gives reconstructions and linear probes something real
to find. Classes beyond 20 reuse the kinds with 2, 3, ... copies of the shape.

Images are generated on the fly from ``numpy.random.default_rng([seed, index])``: the same
(seed, index) always gives the same image, with no caching, for any channel count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _tri(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Equilateral triangle with inradius ``r`` (circumradius 2r), pointing up."""
    inside = np.ones(u.shape, bool)
    for k in range(3):
        a = np.pi / 2 + k * 2 * np.pi / 3
        inside &= (u * np.cos(a) + v * np.sin(a)) >= -r
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    t = np.abs(((phi / (2 * np.pi / 5)) % 1.0) * 2 - 1)  # 1 at the spikes, 0 between
    return rho <= 0.38 + 0.62 * t**1.5


# Shapes in a unit frame: (u, v) are rotated coordinates in units of the shape radius.
SHAPES: dict[str, Mask] = {
    "disk": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: _tri(u, v, 0.5),
    "ring": lambda u, v: (u**2 + v**2 <= 1.0) & (u**2 + v**2 >= 0.55**2),
    "cross": lambda u, v: ((np.abs(u) <= 0.28) | (np.abs(v) <= 0.28)) & (np.maximum(np.abs(u), np.abs(v)) <= 1.0),
    "striped_disk": lambda u, v: (u**2 + v**2 <= 1.0) & (np.sin(u * 2.5 * np.pi) > 0),
    "ellipse": lambda u, v: u**2 + (v / 0.42) ** 2 <= 1.0,
    "rhombus": lambda u, v: np.abs(u) + np.abs(v) / 0.5 <= 1.0,
    "star": _star,
    "checker": lambda u, v: (
        (np.maximum(np.abs(u), np.abs(v)) <= 0.85) & ((np.floor(u / 0.425) + np.floor(v / 0.425)) % 2 == 0)
    ),
    "half_disk": lambda u, v: (u**2 + v**2 <= 1.0) & (v >= -0.1),
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.85) & (np.maximum(np.abs(u), np.abs(v)) >= 0.55),
    "two_dots": lambda u, v: ((u - 0.55) ** 2 + v**2 <= 0.4**2) | ((u + 0.55) ** 2 + v**2 <= 0.4**2),
    "corner": lambda u, v: (
        ((u >= -0.8) & (u <= -0.25) & (np.abs(v) <= 0.8)) | ((np.abs(u) <= 0.8) & (v >= 0.25) & (v <= 0.8))
    ),
    "crescent": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + v**2 >= 0.8**2),
    "triangle_outline": lambda u, v: _tri(u, v, 0.5) & ~_tri(u, v, 0.25),
    "bar": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22),
    "dot_grid": lambda u, v: (
        ((((u + 0.9) % 0.6) - 0.3) ** 2 + (((v + 0.9) % 0.6) - 0.3) ** 2 <= 0.2**2)
        & (np.maximum(np.abs(u), np.abs(v)) <= 0.9)
    ),
    "bullseye": lambda u, v: (u**2 + v**2 <= 0.3**2) | ((u**2 + v**2 >= 0.6**2) & (u**2 + v**2 <= 1.0)),
    "tee": lambda u, v: (
        ((np.abs(u) <= 0.9) & (v >= 0.45) & (v <= 0.9)) | ((np.abs(u) <= 0.22) & (v >= -0.9) & (v <= 0.45))
    ),
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)


def class_names(num_classes: int) -> list[str]:
    """Names of the first ``num_classes`` classes: 'disk', ..., then 'disk x2', ..."""
    names = []
    for k in range(num_classes):
        copies = k // len(SHAPE_NAMES) + 1
        base = SHAPE_NAMES[k % len(SHAPE_NAMES)]
        names.append(base if copies == 1 else f"{base} x{copies}")
    return names


def _colour(rng: np.random.Generator, channels: int, lum: float, spread: float) -> np.ndarray:
    """A random colour [C] with mean value ``lum`` (hue varies, luminance fixed)."""
    c = rng.uniform(-spread, spread, channels) if channels > 1 else np.zeros(1)
    return np.clip(c - c.mean() + lum, 0.0, 1.0)


def _background(rng: np.random.Generator, h: int, w: int, channels: int, lum: float) -> np.ndarray:
    """Textured background [H, W, C] in [0, 1] around luminance ``lum``."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = y / max(h - 1, 1), x / max(w - 1, 1)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        p = x * np.cos(a) + y * np.sin(a)
    elif kind == 1:  # radial gradient
        cy, cx = rng.uniform(0, 1, 2)
        p = np.hypot(x - cx, y - cy)
    elif kind == 2:  # smooth noise: bilinear upsampling of a coarse grid
        g = rng.uniform(0, 1, (4, 4))
        gy, gx = y * 3, x * 3
        y0, x0 = np.minimum(gy.astype(int), 2), np.minimum(gx.astype(int), 2)
        fy, fx = gy - y0, gx - x0
        p = (
            g[y0, x0] * (1 - fy) * (1 - fx)
            + g[y0 + 1, x0] * fy * (1 - fx)
            + g[y0, x0 + 1] * (1 - fy) * fx
            + g[y0 + 1, x0 + 1] * fy * fx
        )
    else:  # faint stripes
        a, f = rng.uniform(0, np.pi), rng.uniform(3, 8)
        p = 0.5 + 0.5 * np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 6.3))
    p = (p - p.min()) / max(float(np.ptp(p)), 1e-8)
    c0 = _colour(rng, channels, lum + rng.uniform(-0.1, 0.1), 0.25)
    c1 = _colour(rng, channels, lum + rng.uniform(-0.1, 0.1), 0.25)
    return c0 * (1 - p[..., None]) + c1 * p[..., None]


def render_shapes(rng: np.random.Generator, label: int, h: int, w: int, channels: int) -> np.ndarray:
    """One image of class ``label`` as uint8 [H, W, C]."""
    kind = SHAPES[SHAPE_NAMES[label % len(SHAPE_NAMES)]]
    copies = label // len(SHAPE_NAMES) + 1
    dark_bg = bool(rng.integers(2))
    bg_lum = rng.uniform(0.1, 0.35) if dark_bg else rng.uniform(0.65, 0.9)
    img = _background(rng, h, w, channels, bg_lum)

    ss = 4 if max(h, w) <= 64 else (2 if max(h, w) <= 256 else 1)  # supersampling
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    side = min(h, w)
    alpha = np.zeros((h * ss, w * ss), np.float64)
    for _ in range(copies):
        r = rng.uniform(0.22, 0.38) * side / np.sqrt(copies)
        cy = rng.uniform(r, h - r) if h > 2 * r else h / 2
        cx = rng.uniform(r, w - r) if w > 2 * r else w / 2
        t = rng.uniform(0, 2 * np.pi)
        dy, dx = (yy - cy) / r, (xx - cx) / r
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        alpha = np.maximum(alpha, kind(u, v).astype(np.float64))
    alpha = alpha.reshape(h, ss, w, ss).mean(axis=(1, 3))[..., None]

    fg_lum = (1.0 - bg_lum) + rng.uniform(-0.1, 0.1)
    fg = _colour(rng, channels, fg_lum, 0.3)
    img = img * (1 - alpha) + fg * alpha
    img = img + rng.normal(0.0, 0.03, img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


class SyntheticShapes(Dataset):
    """Labeled procedural shapes; item ``i`` depends only on ``(seed, i)``.

    Args:
        num_samples: dataset length.
        img_size: int or (height, width) in pixels.
        channels: any number of channels >= 1.
        num_classes: >= 2; label of item ``i`` is ``i % num_classes`` (balanced).
        seed: base seed; different seeds give disjoint-in-practice draws.
        transform: applied to the uint8 tensor [C, H, W] (e.g. ``pretrain_transform``).

    Items are ``(image, label)``: ``transform(uint8 tensor [C, H, W])`` if a transform is
    given, else a float32 tensor [C, H, W] in [0, 1]. The raw image is always a uint8
    tensor (not PIL), so every channel count takes the same path through the transforms.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        img_size: int | tuple[int, int] = 32,
        channels: int = 3,
        num_classes: int = 10,
        seed: int = 0,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        if num_samples < 1 or channels < 1 or num_classes < 2:
            raise ValueError("SyntheticShapes needs num_samples >= 1, channels >= 1, num_classes >= 2")
        self.num_samples = num_samples
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.channels = channels
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform
        self.classes: list[str] = class_names(num_classes)
        self.labeled = True

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """Untransformed item: (uint8 tensor [C, H, W], label)."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, index])
        h, w = self.img_size
        arr = render_shapes(rng, label, h, w, self.channels)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.raw(index)
        if self.transform is not None:
            return self.transform(img), label
        return img.float().div_(255.0), label
