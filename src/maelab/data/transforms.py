"""Per-sample CPU transforms (torchvision ``transforms.v2``).

Both transforms accept a PIL image (mode 'L' or 'RGB') or a uint8 tensor [C, H, W] with
any C, and return a plain float32 tensor [C, h, w] normalized with ``(x - mean) / std``,
where (h, w) is ``img_size``. Images smaller than ``img_size`` (even 1x1) are upscaled.

Randomness (``pretrain_transform`` only) is drawn from torch's global RNG, as torchvision
v2 does, so seeding ``torch.manual_seed`` before each sample makes it exactly reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = int | tuple[int, int]


def default_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization (mean, std): ImageNet's for 3 channels, 0.5/0.5 per channel otherwise."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


def pair_size(size: Size | Sequence[int]) -> tuple[int, int]:
    """An image size as (height, width): an int ``s`` is ``(s, s)``."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std)), v2.ToPureTensor()]


class ClippedRandomResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop from a single draw clipped to the image: the crop of the official linear probe
    (facebookresearch/mae ``util/crop.py``, after BYOL's TF code).

    One area fraction ~ U(scale) and one log aspect ratio ~ U(log ratio) give (h, w), each
    clipped to the image side (and to at least 1 px); the position is uniform. torchvision's
    class instead retries up to 10 draws until one fits and then falls back to a center crop,
    which favours small crops: with scale (0.08, 1) on a square image the mean crop area is
    about 0.44 of the image there and about 0.52 here.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        area = height * width * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
        log_lo, log_hi = self._log_ratio.tolist()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
        w = min(max(1, round(math.sqrt(area * aspect))), width)
        h = min(max(1, round(math.sqrt(area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return dict(top=top, left=left, height=h, width=w)


RESIZED_CROPS: dict[str, type[v2.RandomResizedCrop]] = {
    "torchvision": v2.RandomResizedCrop,
    "official": ClippedRandomResizedCrop,
}
"""Random resized crops by name: torchvision's (up to 10 draws, else a center crop; pre-training and fine-tuning
use it, as the official code does) and the official linear probe's single clipped draw."""


def pretrain_transform(
    img_size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    min_scale: float = 0.2,
    hflip: bool = True,
    normalize: bool = True,
    crop: str = "torchvision",
) -> v2.Compose:
    """MAE pre-training augmentation: random resized crop (+ flip), to a normalized tensor.

    ToImage -> RandomResizedCrop(img_size, scale=(min_scale, 1), bicubic, antialias)
    -> RandomHorizontalFlip (if ``hflip``) -> float32 in [0, 1] -> Normalize(mean, std).
    ``crop`` names the crop in :data:`RESIZED_CROPS` (the linear probe uses ``official``).
    Input: PIL image or uint8 tensor [C, H, W]; output: float32 tensor [C, h, w], or with
    ``normalize=False`` the uint8 tensor [C, h, w] before the last two steps (for
    :class:`maelab.data.prefetch.DeviceBatches`, which does them on the device).
    """
    ops: list[v2.Transform] = [
        v2.ToImage(),
        RESIZED_CROPS[crop](
            pair_size(img_size), scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if not normalize:
        return v2.Compose(ops + [v2.ToPureTensor()])
    return v2.Compose(ops + _finish(mean, std))


def resolve_crop_pct(crop_pct: float | str, img_size: Size | Sequence[int]) -> float:
    """``crop_pct`` as a number; ``auto`` is the official rule (facebookresearch/mae ``util/datasets.py``,
    ``build_transform``): 224 / 256 for inputs up to 224 px, 1.0 above (the longer side of (h, w) decides)."""
    if crop_pct == "auto":
        return 224 / 256 if max(pair_size(img_size)) <= 224 else 1.0
    return float(crop_pct)


def eval_transform(
    img_size: Size, mean: Sequence[float], std: Sequence[float], crop_pct: float | str = "auto"
) -> v2.Compose:
    """Deterministic evaluation transform: resize then center crop, to a normalized tensor.

    As the official code: the short side is resized to ``int(size / crop_pct)`` (aspect kept)
    and the center ``img_size`` is cropped, also with ``crop_pct = 1`` (a center square of an
    oblong image). ``crop_pct="auto"`` resolves by :func:`resolve_crop_pct` (224/256 up to
    224 px, 1.0 above). For a non-square ``img_size`` (h, w) the image is resized to
    ``(int(h / crop_pct), int(w / crop_pct))`` first (with 1.0: simply to (h, w)).
    Input: PIL image or uint8 tensor [C, H, W]; output: float32 tensor [C, h, w].
    """
    crop_pct = resolve_crop_pct(crop_pct, img_size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = pair_size(img_size)
    resize_to = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
    ops: list[v2.Transform] = [
        v2.ToImage(),
        v2.Resize(resize_to, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop((h, w)),
    ]
    return v2.Compose(ops + _finish(mean, std))
