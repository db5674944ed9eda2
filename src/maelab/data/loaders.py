"""The loaders pre-training iterates, and the one over a GPU-resident set.

Three classes give the training loop its batches, one per data path, and all satisfy
:class:`BatchLoader`: :class:`GPUBatchLoader` (a set decoded once and kept on the device,
augmented there in batches), :class:`~maelab.data.jpeg_gpu.JPEGDecodeLoader` (JPEG files
decoded on the device per batch) and :class:`~maelab.data.prefetch.DeviceBatches` (the
per-sample CPU DataLoader's uint8 batches, normalized on the device). Their common arguments
are checked by :func:`check_loader_args`.

:class:`GPUBatchLoader` seeds each batch's crops and flips by
``sample_seed(seed, epoch, position)``: augmentation is a pure function of (seed, epoch, batch
position), so resuming mid-epoch (``sampler.set_epoch(epoch, start)``) reproduces the
uninterrupted run bit for bit (for the same batch size and device).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from maelab.data.gpu_crop import DEFAULT_RATIO, batched_resized_crop, random_resized_crop_params
from maelab.data.loader import ResumableSampler, sample_seed
from maelab.data.transforms import Size, pair_size

__all__ = ["BatchLoader", "GPUBatchLoader", "check_loader_args"]


@runtime_checkable
class BatchLoader(Protocol):
    """One epoch of training batches on the training device, from the position its sampler was set to.

    ``iter`` yields ``(images float32 [B, C, H, W] normalized, labels int64 [B])``, full batches only;
    ``len`` is the number of batches the iteration yields (this rank's, from the sampler's start).
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


def check_loader_args(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: int | None = None,
    batch_size: int | None = None,
    sampler: ResumableSampler | None = None,
    num_items: int | None = None,
) -> None:
    """Raise ValueError for arguments a :class:`BatchLoader` cannot use (None: not known to the caller).

    ``mean`` and ``std`` need one value per channel (``channels`` each, or as many as each other), the
    batch size must be positive, and ``sampler`` must cover exactly the ``num_items`` images."""
    if channels is None and len(mean) != len(std):
        raise ValueError(f"mean/std need as many values, got {len(mean)} and {len(std)}")
    if channels is not None and (len(mean) != channels or len(std) != channels):
        raise ValueError(f"mean/std need {channels} values each, got {len(mean)} and {len(std)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if sampler is not None and num_items is not None and sampler.n != num_items:
        raise ValueError(f"the sampler covers {sampler.n} samples, the dataset has {num_items}")


class GPUBatchLoader:
    """One epoch of augmented batches ``(imgs float32 [B, C, h, w], labels [B])`` from a GPU-resident set.

    A :class:`BatchLoader` (``for imgs, labels in loader``) over images decoded once
    (:func:`~maelab.data.resident.load_uint8_tensor`) and kept on the device: the order is
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
        antialias: resampling of :func:`~maelab.data.gpu_crop.batched_resized_crop`; True (default)
            is the kernel of the CPU ``pretrain_transform``.
        ratio: RandomResizedCrop's aspect-ratio range.
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
        check_loader_args(
            mean, std, channels=images.shape[1], batch_size=batch_size, sampler=sampler, num_items=len(images)
        )
        self.images = images
        self.device = images.device
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.sampler = sampler
        self.img_size = pair_size(img_size)
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
