"""GPU-resident training data: decode the set once, and decide beforehand whether to.

For datasets that fit in device memory (CIFAR-10/100: 50k x 3 x 32 x 32 = 150 MB) the
per-sample CPU pipeline (PIL -> RandomResizedCrop -> flip -> normalize, one image at a time
in worker processes) is the bottleneck of MAE pre-training. Such a set can instead be decoded
once to uint8 (:class:`Uint8Image` as the dataset's transform, :func:`load_uint8_tensor`),
moved to the device, and augmented there in batches
(:class:`~maelab.data.loaders.GPUBatchLoader`, :mod:`maelab.data.gpu_crop`).

Intended for data whose stored size is about the training size (CIFAR at 32 px, STL-10 at
96 px, small synthetic sets, folders of small images). Batches are augmented as ``data.augment=random_crop``
(random resized crop + flip) only: with another ``data.augment`` the set stays on the CPU path
(:func:`maelab.data.pipeline.plan_training_set`). Whether to use it is decided before
anything is decoded (:func:`plan_gpu_resident`): from the one known size of a fixed-size set,
or for a folder from the headers of a few evenly spaced files (:func:`peek_image_sizes`).
The dataset is built once with a :class:`DeferredTransform`, whose transform is set when the
path is chosen (:func:`maelab.data.pipeline.plan_training_set`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from maelab.config import SWITCHES, processes_on_node
from maelab.data.loader import SignalSafeDataLoader
from maelab.data.transforms import Size, cover_size, pair_size

AUTO_MAX_SIDE = 64
"""``gpu_resident='auto'`` turns on only for images whose longer side is at most this."""
PEEK_COUNT = 32
"""``gpu_resident='auto'`` reads the headers of this many evenly spaced files of a folder."""
CPU_MAX_BYTES = 2 * 1024**3
"""Off CUDA, :func:`fits_in_memory` accepts datasets smaller than this."""

__all__ = [
    "AUTO_MAX_SIDE",
    "DeferredTransform",
    "Uint8Image",
    "fits_in_memory",
    "host_available_bytes",
    "load_uint8_tensor",
    "peek_image_sizes",
    "plan_gpu_resident",
    "resident_size",
]


# ---------------------------------------------------------------------------- decoding once
class Uint8Image:
    """PIL image or uint8 tensor -> plain uint8 tensor [C, h, w], no augmentation.

    ``size=None`` keeps the stored size (every image must then have the same size, as in
    CIFAR, STL-10 or the synthetic set). Otherwise an image of exactly ``size`` (h, w) is
    passed through untouched, and any other is resized (bicubic, antialiased, aspect ratio
    kept) to the smallest size covering (h, w), then center-cropped to (h, w).
    """

    def __init__(self, size: Size | None = None) -> None:
        self.size = None if size is None else pair_size(size)

    def __call__(self, img: Any) -> torch.Tensor:
        x = v2.functional.to_dtype(v2.functional.to_image(img), torch.uint8, scale=True)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            ih, iw = (int(s) for s in x.shape[-2:])
            cover = list(cover_size((ih, iw), self.size))
            x = v2.functional.resize(x, cover, interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = v2.functional.center_crop(x, list(self.size))
        return x.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"Uint8Image(size={self.size})"


class DeferredTransform:
    """A dataset transform chosen after the dataset is built, so that it is built only once.

    ``build_dataset(..., transform=t)``, inspect the dataset, then ``t.set(...)`` the
    transform of the path taken (GPU-resident uint8 storage or the per-sample pipeline).
    """

    def __init__(self) -> None:
        self.transform: Callable[[Any], Any] | None = None

    def set(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        if self.transform is None:
            raise RuntimeError("DeferredTransform used before set()")
        return self.transform(img)


def load_uint8_tensor(
    dataset: Dataset, num_workers: int = 0, batch_size: int = 512, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``dataset`` once, in order: ``(images uint8 [N, C, H, W], labels int64 [N])``.

    The dataset's items must be ``(uint8 tensor [C, H, W] of one fixed size, int label)``:
    build it with ``transform=Uint8Image(...)``. Returns CPU tensors (move them to the
    device yourself). A tqdm bar shows progress unless ``progress=False``.

    Raises:
        ValueError: an item is not a uint8 image, or the sizes differ.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("load_uint8_tensor: the dataset is empty")
    from tqdm.auto import tqdm

    loader = SignalSafeDataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    images: torch.Tensor | None = None
    labels = torch.empty(n, dtype=torch.int64)
    pos = 0
    with tqdm(total=n, desc="decoding dataset", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for imgs, labs in loader:
            if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.dim() != 4:
                raise ValueError(
                    "load_uint8_tensor needs items (uint8 tensor [C, H, W], label): build the "
                    f"dataset with transform=Uint8Image(...), got {type(imgs).__name__}"
                    f"{'' if not isinstance(imgs, torch.Tensor) else f' {imgs.dtype} {tuple(imgs.shape)}'}"
                )
            if images is None:
                images = torch.empty((n, *imgs.shape[1:]), dtype=torch.uint8)
            images[pos : pos + len(imgs)] = imgs
            labels[pos : pos + len(imgs)] = torch.as_tensor(labs, dtype=torch.int64)
            pos += len(imgs)
            bar.update(len(imgs))
    assert images is not None and pos == n
    return images, labels


# ---------------------------------------------------------------------------- deciding before decoding
def fits_in_memory(
    n: int, c: int, h: int, w: int, device: torch.device | str, fraction: float = 0.25, free_bytes: int | None = None
) -> bool:
    """Whether ``n`` uint8 images [c, h, w] take at most ``fraction`` of the free memory.

    On CUDA the free memory is ``free_bytes`` if given, else ``torch.cuda.mem_get_info(device)``
    now (so call it after the model is on the device); elsewhere the answer is ``bytes < 2 GiB``.
    """
    nbytes = n * c * h * w
    device = torch.device(device)
    if device.type == "cuda":
        free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
        return nbytes <= fraction * free
    return nbytes < CPU_MAX_BYTES


def peek_image_sizes(paths: Sequence[str], count: int = PEEK_COUNT) -> list[tuple[int, int]]:
    """(height, width) of up to ``count`` evenly spaced files of ``paths``, from their headers.

    Pillow only parses the header (no pixel decoding), so this costs well under a millisecond
    per file. Files Pillow cannot open are left out (the loader's skip/strict policy deals
    with them later).
    """
    from PIL import Image

    n = len(paths)
    picks = sorted({(k * n) // count for k in range(count)}) if n > count else range(n)
    sizes: list[tuple[int, int]] = []
    for k in picks:
        try:
            with Image.open(paths[k]) as img:
                w, h = img.size
        except Exception:  # noqa: BLE001 - any unreadable file is simply not peeked
            continue
        sizes.append((int(h), int(w)))
    return sizes


def resident_size(sizes: Sequence[tuple[int, int]], img_size: Size, max_side: int = AUTO_MAX_SIDE) -> tuple[int, int]:
    """The (h, w) to store a GPU-resident set at, from the (h, w) ``sizes`` of (some of) its images.

    Their common size when they all agree and its longer side is at most ``max_side``
    (images are then cropped at their own resolution, as on the CPU path); otherwise the
    model's input size ``img_size`` (images are resized to it once).
    """
    common = set(sizes)
    if len(common) == 1:
        (size,) = common
        if max(size) <= max_side:
            return size
    return pair_size(img_size)


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_gpu_resident(
    mode: str,
    device: torch.device | str,
    num_images: int,
    channels: int,
    sizes: Sequence[tuple[int, int]],
    img_size: Size,
    max_side: int = AUTO_MAX_SIDE,
    fraction: float = 0.25,
    free_bytes: int | None = None,
    host_free_bytes: int | None = None,
    procs_on_node: int | None = None,
) -> tuple[int, int] | None:
    """Resolve ``data.gpu_resident`` before decoding anything: the (h, w) to store the set at, or None.

    Args:
        mode: ``'on'``, ``'off'`` or ``'auto'``.
        device: the training device.
        num_images, channels: the set's size and channel count.
        sizes: (h, w) of the images looked at: the one known size of a fixed-size set, or a
            :func:`peek_image_sizes` sample of a folder.
        img_size: the model's input size (the storage size when ``sizes`` disagree).
        max_side, fraction, free_bytes: see :func:`fits_in_memory`; ``free_bytes`` replaces
            the CUDA query (tests, or a caller that already knows).
        host_free_bytes, procs_on_node: replace :func:`host_available_bytes` and
            :func:`maelab.config.processes_on_node` (tests).

    ``'auto'`` is on only for CUDA devices when ``sizes`` is not empty, every one of them has a
    longer side of at most ``max_side``, and the set, stored at :func:`resident_size`, fits in
    ``fraction`` of the free device memory, and the copies every rank on this host decodes at
    the same time fit in half of the available host memory (8 ranks x 15.7 GB for ImageNet at
    64 px would not). ``'on'`` stores at :func:`resident_size`.
    """
    if mode not in SWITCHES:
        raise ValueError(f"gpu_resident must be auto, on or off, not {mode!r}")
    if mode == "off":
        return None
    store = resident_size(sizes, img_size, max_side)
    if mode == "on":
        return store
    device = torch.device(device)
    if device.type != "cuda" or not sizes or max(max(s) for s in sizes) > max_side:
        return None
    if not fits_in_memory(num_images, channels, *store, device, fraction, free_bytes):
        return None
    host = host_free_bytes if host_free_bytes is not None else host_available_bytes()
    procs = procs_on_node if procs_on_node is not None else processes_on_node()
    if host is not None and procs * num_images * channels * store[0] * store[1] > host // 2:
        return None
    return store
