"""GPU-resident training data: a uint8 tensor on the device, augmented in batches there.

For datasets that fit in device memory (CIFAR-10/100: 50k x 3 x 32 x 32 = 150 MB) the
per-sample CPU pipeline (PIL -> RandomResizedCrop -> flip -> normalize, one image at a time
in worker processes) is the bottleneck of MAE pre-training. Here the images are decoded
once (:func:`load_uint8_tensor`), moved to the device, and :class:`GPUBatchLoader` draws a
RandomResizedCrop + horizontal flip for a whole batch with a few batched tensor ops:

1. :func:`random_resized_crop_params`: torchvision's ``RandomResizedCrop`` parameter
   sampling (10 attempts, center-crop fallback), vectorized over the batch;
2. :func:`batched_resized_crop`: crop + bicubic resize + flip + ``/255`` + normalize of
   every sample in one call.

Everything is plain torch, so it runs (and is tested) on CPU too. Randomness comes from a
``torch.Generator`` on the images' device, seeded per batch by
``sample_seed(seed, epoch, position)``: augmentation is a pure function of (seed, epoch,
batch position), so resuming mid-epoch (``sampler.set_epoch(epoch, start)``) reproduces
the uninterrupted run bit for bit (for the same batch size and device).

Intended for data whose stored size is about the training size (CIFAR at 32 px, STL-10 at
96 px, small synthetic sets, folders of small images). Whether to use it is decided before
anything is decoded (:func:`plan_gpu_resident`): from the one known size of a fixed-size set,
or for a folder from the headers of a few evenly spaced files (:func:`peek_image_sizes`).
Differences from the CPU path (:func:`pretrain_transform`):

* crop parameters: the same distribution, drawn from a different random stream;
* ``antialias=True`` (the loader's default) uses the same separable, PIL-style bicubic
  kernel as torchvision's ``resize(antialias=True)`` (Keys a=-0.5, support widened by the
  downscale factor, weights renormalized inside the crop), so for float images it matches
  ``F.resized_crop(..., antialias=True)`` to float rounding. The CPU path resizes *uint8*
  images with torchvision's native uint8 kernel (integer weights, rounding after each of
  its two passes); the GPU path keeps float values, a difference of about one uint8 level;
* ``antialias=False`` uses ``F.grid_sample(mode='bicubic')`` (Keys a=-0.75, like
  ``F.resized_crop(..., antialias=False)``), which does not low-pass filter when it
  downscales, and which reads the real neighbours of the crop where torchvision crops first
  and replicates the crop's edge pixels (see :func:`batched_resized_crop`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from maelab.config import BUILTIN_DATASETS, processes_on_node
from maelab.data.loader import ResumableSampler, SignalSafeDataLoader, sample_seed

Size = int | tuple[int, int]

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
NUM_ATTEMPTS = 10
"""RandomResizedCrop tries this many (area, aspect) draws before the center-crop fallback."""
AUTO_MAX_SIDE = 64
"""``gpu_resident='auto'`` turns on only for images whose longer side is at most this."""
PEEK_COUNT = 32
"""``gpu_resident='auto'`` reads the headers of this many evenly spaced files of a folder."""
FIXED_SIZE_DATASETS = BUILTIN_DATASETS
"""Built-in datasets whose images all have one stored size (keep it: ``uint8_transform(None)``)."""
CPU_MAX_BYTES = 2 * 1024**3
"""Off CUDA, :func:`fits_in_memory` accepts datasets smaller than this."""

__all__ = [
    "FIXED_SIZE_DATASETS",
    "DeferredTransform",
    "GPUBatchLoader",
    "Uint8Image",
    "antialiased_resized_crop",
    "batched_resized_crop",
    "fits_in_memory",
    "load_uint8_tensor",
    "peek_image_sizes",
    "plan_gpu_resident",
    "random_resized_crop_params",
    "resident_size",
    "uint8_transform",
    "use_gpu_resident",
]


def _hw(size: Size | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ---------------------------------------------------------------------------- decoding once
class Uint8Image:
    """PIL image or uint8 tensor -> plain uint8 tensor [C, h, w], no augmentation.

    ``size=None`` keeps the stored size. Otherwise an image of exactly ``size`` (h, w) is
    passed through untouched, and any other is resized (bicubic, antialiased, aspect ratio
    kept) to the smallest size covering (h, w), then center-cropped to (h, w).
    """

    def __init__(self, size: Size | None = None) -> None:
        self.size = None if size is None else _hw(size)

    def __call__(self, img: Any) -> torch.Tensor:
        x = v2.functional.to_dtype(v2.functional.to_image(img), torch.uint8, scale=True)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            h, w = self.size
            ih, iw = (int(s) for s in x.shape[-2:])
            if h * iw >= w * ih:  # the height governs (torchvision's int(size * long / short) rounding)
                nh, nw = h, max(w, int(h * iw / ih))
            else:
                nh, nw = max(h, int(w * ih / iw)), w
            x = v2.functional.resize(x, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = v2.functional.center_crop(x, [h, w])
        return x.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"Uint8Image(size={self.size})"


def uint8_transform(img_size: Size | None = None) -> Uint8Image:
    """PIL image or uint8 tensor -> plain uint8 tensor [C, h, w], no augmentation.

    ``img_size=None`` keeps the stored size (every image must then have the same size, as
    in CIFAR, STL-10 or the synthetic set). Otherwise images of that size pass through
    untouched and the others are resized (bicubic, antialiased) to cover ``img_size`` and
    center-cropped to it (:class:`Uint8Image`).
    """
    return Uint8Image(img_size)


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
    build it with ``transform=uint8_transform(...)``. Returns CPU tensors (move them to the
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
                    f"dataset with transform=uint8_transform(...), got {type(imgs).__name__}"
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


# ---------------------------------------------------------------------------- deciding
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
    return _hw(img_size)


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
    if mode not in ("auto", "on", "off"):
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


def use_gpu_resident(
    mode: str,
    device: torch.device | str,
    num_images: int,
    image_shape: Sequence[int],
    max_side: int = AUTO_MAX_SIDE,
    fraction: float = 0.25,
) -> bool:
    """Resolve a ``data.gpu_resident`` setting for images of one known shape [C, H, W].

    ``'auto'`` is on for CUDA devices when the images have a longer side of at most
    ``max_side`` and the whole set fits in ``fraction`` of the free device memory
    (:func:`fits_in_memory`). See :func:`plan_gpu_resident` for sets of several sizes.
    """
    c, h, w = (int(s) for s in image_shape)
    return plan_gpu_resident(mode, device, num_images, c, [(h, w)], (h, w), max_side, fraction) is not None


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
    oh, ow = _hw(out_size)
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
    oh, ow = _hw(out_size)
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


# ---------------------------------------------------------------------------- loader
class GPUBatchLoader:
    """One epoch of augmented batches ``(imgs float32 [B, C, h, w], labels [B])`` on the device.

    A drop-in for the pre-training DataLoader (``for imgs, labels in loader``): the order is
    ``sampler.order()`` from ``sampler.start`` (call ``sampler.set_epoch(epoch, start)``
    before iterating, as for the CPU path), incomplete last batches are dropped, and each
    batch's crops and flips are drawn from a generator on the images' device seeded with
    ``sample_seed(seed, epoch, position * world_size + rank)``, where ``position`` is the
    batch's first position in this rank's order (on one process: just the position). So the
    batches of an epoch depend only on (seed, epoch, position), and a run resumed at a batch
    boundary continues exactly as the uninterrupted one.

    Args:
        images: uint8 [N, C, H, W], on the device that should do the work.
        labels: [N] (moved to the images' device).
        batch_size: images per batch.
        sampler: the run's :class:`~maelab.data.loader.ResumableSampler` (``num_samples == N``).
        img_size: output size, int or (h, w).
        mean, std: per-channel normalization.
        min_scale: RandomResizedCrop's smallest area fraction (aspect ratio range 3/4..4/3).
        hflip: mirror half of the samples.
        seed: augmentation seed.
        antialias: resampling of :func:`batched_resized_crop`; True (default) is the kernel of
            the CPU ``pretrain_transform``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: ResumableSampler,
        img_size: Size,
        mean: Sequence[float],
        std: Sequence[float],
        min_scale: float = 0.2,
        hflip: bool = True,
        seed: int = 0,
        antialias: bool = True,
        ratio: tuple[float, float] = DEFAULT_RATIO,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if sampler.n != len(images):
            raise ValueError(f"the sampler covers {sampler.n} samples, the images are {len(images)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values each, got {len(mean)} and {len(std)}")
        self.images = images
        self.device = images.device
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.sampler = sampler
        self.img_size = _hw(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.scale = (float(min_scale), 1.0)
        self.ratio = ratio
        self.hflip = hflip
        self.seed = seed
        self.antialias = antialias
        self.generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        """Full batches left in the epoch (from ``sampler.start``)."""
        return len(self.sampler) // self.batch_size

    def batch_seed(self, epoch: int, position: int) -> int:
        """Seed of the batch starting at ``position`` of this rank's order in ``epoch``."""
        s = self.sampler
        return sample_seed(self.seed, epoch, position * s.world_size + s.rank)

    def augment(self, idx: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        """The augmented, normalized images ``idx`` (a batch starting at ``position``)."""
        g = self.generator.manual_seed(self.batch_seed(epoch, position))
        n = len(idx)
        _, _, height, width = self.images.shape
        boxes = random_resized_crop_params(n, height, width, self.scale, self.ratio, generator=g)
        flip = None
        if self.hflip:
            flip = torch.rand(n, generator=g, device=self.device) < 0.5
        return batched_resized_crop(
            self.images[idx], boxes, self.img_size, flip, self.mean, self.std, antialias=self.antialias
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.sampler
        epoch, start = s.epoch, s.start
        order = s.order()[start:]
        bs = self.batch_size
        full = len(order) // bs
        order_t = torch.tensor(order[: full * bs], dtype=torch.int64).to(self.device, non_blocking=True)
        for k in range(full):
            idx = order_t[k * bs : (k + 1) * bs]
            yield self.augment(idx, epoch, start + k * bs), self.labels[idx]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (
            f"GPUBatchLoader({n} images [{c}, {h}, {w}] on {self.device}, batch_size={self.batch_size}, "
            f"img_size={self.img_size}, scale={self.scale}, hflip={self.hflip}, antialias={self.antialias})"
        )
