"""Robust image loading.

:func:`load_image` opens any file Pillow can read and returns an 8-bit ``RGB`` (3
channels) or ``L`` (1 channel) image, whatever the file's own mode:

- transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) is composited
  on a white background;
- 16-bit images (``I;16*``, and ``I`` with values in ``[0, 65535]``) are scaled to 8 bits
  (``v / 257``), not clipped at 255; other ``I`` and ``F`` (float) images are scaled from
  ``[0, 1]`` if they lie there, else min-max normalized;
- ``CMYK``, ``YCbCr``, ``1``, palette and the other modes go through Pillow's ``convert``.

Large files: Pillow refuses images above ``Image.MAX_IMAGE_PIXELS`` (about 89M pixels) as
possible "decompression bombs". Our loader allows up to :data:`MAX_PIXELS` instead (a
10,000 x 10,000 scan is a legitimate training image), by lifting Pillow's limit only while
*it* opens a file (under a lock, see :func:`pixel_limit_lifted`); Pillow's global setting is
left as it was for everyone else. With ``target_size``, JPEGs are decoded at a reduced
scale (``draft``) and other huge images are box-reduced, never below ``target_size`` on
the short side, so big files stay cheap.

Every failure (missing, zero-byte, truncated, not an image, too large) raises
:class:`~maelab.errors.DataError` ``"cannot read image {path}: {reason}"``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maelab.errors import DataError

MAX_PIXELS = 300_000_000
"""Largest image (width * height) :func:`load_image` accepts, ~17,000 x 17,000."""

_LIMIT_LOCK = threading.RLock()


@contextmanager
def pixel_limit_lifted() -> Iterator[None]:
    """Disable Pillow's decompression-bomb check inside the block (thread-safe among users).

    Use it around Pillow operations on an image already known to be within
    :data:`MAX_PIXELS` (Pillow also checks sizes when cropping).
    """
    with _LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def exceeds_pil_limit(img: Image.Image) -> bool:
    """True when Pillow would warn about ``img``'s size (so transforms need the limit lifted)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and img.width * img.height > limit


def _scale_to_uint8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Map an integer or float array [H, W] to uint8 without clipping the dynamic range."""
    a = arr.astype(np.float64)
    if a.size == 0:
        return np.zeros(arr.shape, np.uint8)
    a[~np.isfinite(a)] = 0.0
    lo, hi = float(a.min()), float(a.max())
    if sixteen_bit and lo >= 0 and hi <= 65535:
        a = a / 257.0
    elif not sixteen_bit and lo >= 0 and hi <= 1.0:
        a = a * 255.0
    elif hi > lo:
        a = (a - lo) / (hi - lo) * 255.0
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return img.mode in ("P", "L", "RGB") and "transparency" in img.info


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit ``mode`` ('RGB' or 'L').

    Returns ``img`` itself when it already has that mode.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        gray = Image.fromarray(_scale_to_uint8(np.asarray(img), sixteen_bit=True), "L")
        return gray if mode == "L" else gray.convert(mode)
    if img.mode == "F":
        gray = Image.fromarray(_scale_to_uint8(np.asarray(img), sixteen_bit=False), "L")
        return gray if mode == "L" else gray.convert(mode)
    if _has_transparency(img):
        rgba = img.convert("LA" if img.mode == "La" else img.mode).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(mode)
    if img.mode == mode:
        return img
    if img.mode not in ("1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX"):
        img = img.convert("RGB")  # LAB, HSV, ... go through RGB first
    return img.convert(mode)


def _reduce_factor(size: tuple[int, int], target_size: int) -> int:
    """Largest integer box-reduction factor keeping the short side >= target_size."""
    return max(1, min(size) // max(1, target_size))


def _is_empty(path: str | Path) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except OSError:
        return False


def load_image(
    path: str | Path | bytes, channels: int = 3, target_size: int | None = None, name: str | None = None
) -> Image.Image:
    """Read an image file (or its encoded bytes) as an 8-bit PIL image with ``channels`` (1 -> 'L', 3 -> 'RGB').

    Args:
        path: image file, or the file's bytes (a WebDataset or Hugging Face ``datasets`` sample).
        name: what errors call the image (default: ``path``; give one for bytes).
        channels: 1 or 3.
        target_size: if given, the image may be decoded/reduced to a smaller size whose
            short side is still >= target_size (fast path for huge JPEGs). None keeps the
            full resolution.

    Returns:
        A PIL image of mode 'RGB' or 'L', fully loaded (the file is closed).

    Raises:
        DataError: the file is missing, unreadable, truncated, not an image, or larger than
            :data:`MAX_PIXELS`.
    """
    where: str | Path = name or ("<image bytes>" if isinstance(path, bytes) else path)
    if channels not in (1, 3):
        raise DataError(f"cannot read image {where}: image files give 1 or 3 channels, not channels={channels}")
    mode = "RGB" if channels == 3 else "L"
    try:
        if isinstance(path, bytes) and not path:
            raise DataError(f"cannot read image {where}: empty file (0 bytes)")
        with pixel_limit_lifted():
            img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(
                    f"cannot read image {where}: {w}x{h} pixels is more than "
                    f"maelab.data.images.MAX_PIXELS={MAX_PIXELS:,}"
                )
            if w < 1 or h < 1:
                raise DataError(f"cannot read image {where}: empty image ({w}x{h})")
            if target_size is not None and img.format == "JPEG":
                draft_mode = mode if img.mode in ("RGB", "L") else None
                img.draft(draft_mode, (target_size, target_size))
            img.load()
            out = _to_mode(img, mode)
            if target_size is not None:
                factor = _reduce_factor(out.size, target_size)
                if factor > 1:
                    out = out.reduce(factor)
            return out
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem
        reason = str(e) or type(e).__name__
        if isinstance(e, FileNotFoundError):
            reason = "no such file"
        elif isinstance(e, IsADirectoryError):
            reason = "is a directory"
        elif isinstance(e, UnidentifiedImageError):
            empty = not isinstance(path, bytes) and _is_empty(path)
            reason = "empty file (0 bytes)" if empty else "not a recognised image format"
        raise DataError(f"cannot read image {where}: {reason}") from e
