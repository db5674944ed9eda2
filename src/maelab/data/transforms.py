"""Per-sample CPU transforms (torchvision ``transforms.v2``).

Both transforms accept a PIL image (mode 'L' or 'RGB') or a uint8 tensor [C, H, W] with
any C, and return a plain float32 tensor [C, h, w] normalized with ``(x - mean) / std``,
where (h, w) is ``img_size``. Images smaller than ``img_size`` (even 1x1) are upscaled.

Randomness (``pretrain_transform`` only) is drawn from torch's global RNG, as torchvision
v2 does, so seeding ``torch.manual_seed`` before each sample makes it exactly reproducible.
``pretrain_transform``'s ``augment`` selects the MAE paper's augmentation ablation (Table 1e,
``data.augment``): ``none``, ``fixed_crop``, ``random_crop`` (the default) or
``random_crop+color_jitter``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from maelab.config import AUGMENTATIONS

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


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest (h, w) with the aspect ratio of ``size`` (h, w) that covers ``target`` (h, w), the long side
    truncated as torchvision's ``Resize(int)`` does: for a square target, the short side becomes its side."""
    h, w = target
    ih, iw = size
    if h * iw >= w * ih:  # the height governs
        return h, max(w, int(h * iw / ih))
    return max(h, int(w * ih / iw)), w


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


FIXED_CROP_PCT = 0.875
"""``fixed_crop``: an image of another size than the input is resized to cover ``img_size / FIXED_CROP_PCT``
(ImageNet practice: 256 px for a 224 px crop)."""
FIXED_CROP_PAD = 4
"""``fixed_crop``: an image already at the input size is padded this many pixels (reflected) on each side (CIFAR
practice)."""
COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
"""``random_crop+color_jitter``: ColorJitter's (brightness, contrast, saturation, hue), MoCo v2's (``aug_plus``)."""
COLOR_JITTER_P = 0.8
"""``random_crop+color_jitter``: the probability that an image is jittered."""


class FixedScaleCrop:
    """A random crop of ``size`` (h, w) at one fixed scale: ``data.augment=fixed_crop`` (the MAE paper's "crop,
    fixed size").

    An image of exactly ``size`` is padded :data:`FIXED_CROP_PAD` px by reflection, then cropped at a uniform
    position (the CIFAR practice, ``RandomCrop(32, padding=4)``); any other image (larger or smaller) is resized
    (bicubic, antialiased, aspect ratio kept, :func:`cover_size`) to cover ``size / crop_pct``, then cropped at
    a uniform position (the ImageNet practice, ``Resize(256)`` + ``RandomCrop(224)``). Either way every crop
    shows the image at the same scale. Input and output: uint8 image [C, H, W] -> [C, h, w].
    """

    def __init__(self, size: Size, crop_pct: float = FIXED_CROP_PCT, pad: int = FIXED_CROP_PAD) -> None:
        self.size, self.pad = pair_size(size), pad
        self.target = (int(self.size[0] / crop_pct), int(self.size[1] / crop_pct))
        self.crop = v2.RandomCrop(self.size)
        self.padded_crop = v2.RandomCrop(self.size, padding=pad, padding_mode="reflect")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        height, width = v2.query_size([img])
        if (height, width) == self.size:
            return self.padded_crop(img)
        resized = v2.functional.resize(
            img, list(cover_size((height, width), self.target)), InterpolationMode.BICUBIC, antialias=True
        )
        return self.crop(resized)

    def __repr__(self) -> str:
        return f"FixedScaleCrop(size={self.size}, resize_to_cover={self.target}, pad={self.pad})"


def pretrain_transform(
    img_size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    min_scale: float = 0.2,
    hflip: bool = True,
    normalize: bool = True,
    crop: str = "torchvision",
    augment: str = "random_crop",
    crop_pct: float | str = "auto",
) -> v2.Compose:
    """MAE pre-training augmentation (``data.augment``, the paper's Table 1e), to a normalized tensor.

    ToImage, then by ``augment``:

    * ``random_crop`` (the paper's default): RandomResizedCrop(img_size, scale=(min_scale, 1), bicubic,
      antialias) -> RandomHorizontalFlip (if ``hflip``). ``crop`` names the crop in :data:`RESIZED_CROPS`
      (the linear probe uses ``official``);
    * ``random_crop+color_jitter``: the same, then ColorJitter(:data:`COLOR_JITTER`) with probability
      :data:`COLOR_JITTER_P` (MoCo v2's jitter; MoCo v3 and BYOL use saturation 0.2). 1 or 3 channels only
      (saturation and hue leave a single channel as it is);
    * ``fixed_crop``: :class:`FixedScaleCrop` (a random crop at one scale) -> RandomHorizontalFlip (if
      ``hflip``); ``min_scale`` and ``crop`` are not used;
    * ``none``: the resize and center crop of :func:`eval_transform` (``crop_pct``), no flip: deterministic.

    Then float32 in [0, 1] -> Normalize(mean, std). Input: PIL image or uint8 tensor [C, H, W]; output: float32
    tensor [C, h, w], or with ``normalize=False`` the uint8 tensor [C, h, w] before the last two steps (for
    :class:`maelab.data.prefetch.DeviceBatches`, which does them on the device).

    Raises:
        ValueError: an unknown ``augment``, or color jitter for a channel count other than 1 or 3.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, not {augment!r}")
    jitter = augment == "random_crop+color_jitter"
    if jitter and len(mean) not in (1, 3):
        raise ValueError(f"augment={augment!r} needs 1 or 3 channels, not {len(mean)}")
    ops: list[Callable[[Any], Any]] = [v2.ToImage()]
    if augment == "none":
        ops += _center_crop(img_size, crop_pct)
    elif augment == "fixed_crop":
        ops.append(FixedScaleCrop(img_size))
    else:
        ops.append(
            RESIZED_CROPS[crop](
                pair_size(img_size), scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        )
    if hflip and augment != "none":
        ops.append(v2.RandomHorizontalFlip())
    if jitter:
        ops.append(v2.RandomApply([v2.ColorJitter(*COLOR_JITTER)], p=COLOR_JITTER_P))
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
    return v2.Compose([v2.ToImage(), *_center_crop(img_size, crop_pct), *_finish(mean, std)])


def _center_crop(img_size: Size, crop_pct: float | str) -> list[v2.Transform]:
    """:func:`eval_transform`'s resize and center crop (also ``pretrain_transform(augment="none")``)."""
    crop_pct = resolve_crop_pct(crop_pct, img_size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = pair_size(img_size)
    resize_to = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
    return [v2.Resize(resize_to, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop((h, w))]
