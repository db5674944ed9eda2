"""From a :class:`~maelab.config.DataConfig` to what pre-training iterates: one call, one path.

:func:`build_training_data` builds the training set once and picks its path:

* WebDataset shards: the stream is its own sampler; a DataLoader of uint8 crops,
  normalized on the device (:class:`~maelab.data.prefetch.DeviceBatches`);
* GPU-resident (``data.gpu_resident``, :func:`~maelab.data.resident.plan_gpu_resident`): the
  set decoded once to uint8 and kept on the device, augmented there in batches
  (:class:`~maelab.data.loaders.GPUBatchLoader`);
* ``data.decode=gpu`` (image folders): workers read the files, the device decodes and
  augments each batch (:class:`~maelab.data.jpeg_gpu.JPEGDecodeLoader`);
* otherwise the per-sample CPU DataLoader of uint8 crops, normalized on the device
  (:class:`~maelab.data.prefetch.DeviceBatches`).

Samplers, seeds and transforms are those of each path, so a run is reproducible and resumes
exactly whichever path it takes. The GPU paths augment as ``data.augment=random_crop`` only: another
``data.augment`` (:func:`~maelab.data.transforms.pretrain_transform`) takes a CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from maelab.config import BUILTIN_DATASETS, DataConfig
from maelab.data.build import build_dataset
from maelab.data.folders import ImageFolderDataset
from maelab.data.jpeg_gpu import JPEGDecodeLoader, resolve_decode
from maelab.data.loader import ResumableSampler, build_loader
from maelab.data.loaders import BatchLoader, GPUBatchLoader
from maelab.data.prefetch import DeviceBatches
from maelab.data.resident import DeferredTransform, Uint8Image, load_uint8_tensor, peek_image_sizes, plan_gpu_resident
from maelab.data.shards import ShardStream, build_stream_loader
from maelab.data.transforms import Size, eval_transform, pretrain_transform
from maelab.errors import ConfigError, DataError

__all__ = ["TrainingData", "TrainingSet", "build_training_data", "plan_training_set"]


class TrainingSet(NamedTuple):
    """The training set, built once, with its transform set for the path taken."""

    dataset: Any
    """An indexable Dataset, or a :class:`~maelab.data.shards.ShardStream`."""
    transform: DeferredTransform
    """The dataset's transform (:meth:`TrainingData.fixed_images` swaps it for the moment)."""
    store: tuple[int, int] | None
    """The (h, w) the set is kept on the device at; None: not GPU-resident."""


def plan_training_set(
    data: DataConfig,
    *,
    img_size: Size,
    in_chans: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
    device: torch.device,
) -> TrainingSet:
    """Build the training set once and decide whether it is kept on the device, before anything is decoded.

    ``data.gpu_resident`` is resolved by :func:`~maelab.data.resident.plan_gpu_resident`: from the stored size
    of a built-in set (one sample), or for a folder from the headers of a few evenly spaced files; ``auto`` is
    off off CUDA, with ``data.decode=gpu`` and with a ``data.augment`` other than ``random_crop`` (the GPU paths
    implement only that one). Then the transform is set for the path taken: uint8 images for
    :func:`~maelab.data.resident.load_uint8_tensor` (built-in sets keep their size; folders their common size,
    or the model's input size ``img_size`` when the sizes differ), else the per-sample ``pretrain_transform``
    of ``data.augment`` ending in uint8 crops (normalized on the device).

    Raises:
        ConfigError: ``gpu_resident=on`` or ``decode=gpu`` for shards or a Hugging Face dataset, or with a
            ``data.augment`` other than ``random_crop``; color jitter for ``in_chans`` other than 1 or 3.
        DataError: from :func:`~maelab.data.build.build_dataset`.
    """
    augment = str(data.augment)
    if augment != "random_crop" and (data.gpu_resident == "on" or data.decode == "gpu"):
        gpu_path = "data.gpu_resident=on" if data.gpu_resident == "on" else "data.decode=gpu"
        raise ConfigError(
            f"data.augment={augment} needs the CPU path: {gpu_path} augments as random_crop only; "
            "use gpu_resident=auto or off and decode=cpu"
        )
    if augment == "random_crop+color_jitter" and in_chans not in (1, 3):
        raise ConfigError(f"data.augment={augment} needs 1 or 3 channels, not in_chans={in_chans}")
    transform = DeferredTransform()
    ds: Any = build_dataset(data, img_size=img_size, in_chans=in_chans, train=True, transform=transform, seed=seed)
    fixed = data.name.lower() in BUILTIN_DATASETS
    mode = str(data.gpu_resident)  # auto, on or off once DataConfig is built
    if not (fixed or type(ds) is ImageFolderDataset):  # shards and HF datasets: the CPU DataLoader
        if mode == "on" or data.decode == "gpu":
            raise ConfigError(
                f"data.gpu_resident=on and data.decode=gpu need an image folder or a built-in "
                f"dataset, not {data.name!r}: use gpu_resident=auto and decode=cpu"
            )
        mode = "off"
    if mode == "auto" and (device.type != "cuda" or data.decode == "gpu" or augment != "random_crop"):
        mode = "off"  # an explicit decode=gpu asks for per-batch device decoding; other augmentations are CPU-only
    store = None
    if mode != "off":
        sizes: list[tuple[int, int]]
        if fixed:
            transform.set(Uint8Image(None))
            h, w = ds[0][0].shape[-2:]
            sizes = [(int(h), int(w))]
        else:
            sizes = peek_image_sizes([path for path, _ in ds.samples])
        store = plan_gpu_resident(mode, device, len(ds), in_chans, sizes, img_size)
        if store is not None and fixed:
            store = sizes[0]  # fixed-size sets keep their stored size (crops are resized, as on the CPU path)
    if store is not None:
        transform.set(Uint8Image(None if fixed else store))
    else:
        # uint8 crops: DeviceBatches normalizes them on the device (a quarter of the bytes to copy)
        transform.set(
            pretrain_transform(
                img_size,
                mean,
                std,
                data.min_scale,
                data.hflip,
                normalize=False,
                augment=augment,
                crop_pct=data.crop_pct,
            )
        )
    return TrainingSet(ds, transform, store)


@dataclass
class TrainingData:
    """What pre-training iterates (:func:`build_training_data`).

    Each epoch: ``sampler.set_epoch(epoch, start=start)`` with ``start`` the samples *this rank* has already
    done in the epoch (``batches_done * batch_size``; 0 for a fresh epoch), then ``for imgs, labels in loader``.
    """

    dataset: Any
    """The training set: an indexable Dataset, or a :class:`~maelab.data.shards.ShardStream`."""
    sampler: Any
    """Has ``set_epoch(epoch: int, start: int = 0)``: a :class:`~maelab.data.loader.ResumableSampler`, or the
    ShardStream itself."""
    loader: BatchLoader
    """Yields ``(images float32 [B, C, H, W] normalized, on the device; labels [B])``."""
    batches_per_epoch: int
    """This rank's full batches per epoch (this rank's samples // batch_size)."""
    gpu_resident: bool
    description: str
    """The path in a few words, for the run's summary: e.g. ``GPU-resident``, ``4 workers``, ``4 workers,
    data.augment=none`` (an augmentation other than the default is named)."""
    transform: DeferredTransform
    """The dataset's transform (the training one; :meth:`fixed_images` swaps it for the moment)."""

    def fixed_images(
        self, n: int, img_size: Size, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float | str = "auto"
    ) -> torch.Tensor:
        """``n`` evenly spaced training images with the evaluation transform (no augmentation): float32
        [n', C, H, W], n' <= n (fewer when the set is smaller; a ShardStream gives the first readable images of
        its first shard). For reconstruction figures.

        Read from the training set itself with the evaluation transform swapped in for the moment, so the set is
        not built or scanned a second time: call it before iterating :attr:`loader` (its DataLoader workers, once
        started, keep the transform they were forked with)."""
        ds, training = self.dataset, self.transform.transform
        assert training is not None  # set by plan_training_set
        fixed = eval_transform(img_size, mean, std, crop_pct)
        self.transform.set(fixed)
        try:
            n = min(n, len(ds))
            step = max(len(ds) // n, 1)
            if isinstance(ds, ShardStream):  # a stream: its first images
                return torch.stack(ds.head(n, fixed))
            return torch.stack([ds[i * step][0] for i in range(n)])
        finally:
            self.transform.set(training)


def build_training_data(
    data: DataConfig,
    *,
    img_size: Size,
    in_chans: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    seed: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> TrainingData:
    """The training set (built once), this rank's resumable sampler and the loader of the path taken.

    Args:
        data: the data section of the config.
        img_size: the model's input size; in_chans: its channels.
        mean, std: per-channel normalization (``in_chans`` values each).
        batch_size: images per batch on this rank.
        seed: the run's seed (data order and augmentation).
        device: the training device (where batches are delivered; GPU-resident sets live there).
        rank, world_size: this process among the training processes (a ShardStream takes them from
            ``torch.distributed`` when it is built).
        progress: show the decoding bar of a GPU-resident set (pass False on ranks other than 0).

    Raises:
        DataError: fewer images than one global batch (``batch_size * world_size``), or from building the set.
        ConfigError: see :func:`plan_training_set`.
    """
    device = torch.device(device)
    ds, transform, store = plan_training_set(
        data, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed, device=device
    )
    if len(ds) < batch_size * world_size:
        raise DataError(
            f"dataset {data.name!r} has {len(ds)} images, fewer than one global batch "
            f"(batch_size={batch_size} x {world_size} processes): lower --batch-size"
        )
    sampler: Any = ResumableSampler(len(ds), seed=seed, shuffle=True, rank=rank, world_size=world_size)
    per_rank = len(sampler)
    pin = device.type == "cuda"
    workers = int(data.num_workers)  # an int once DataConfig is built (auto resolved)
    loader: BatchLoader
    description = f"{workers} workers"
    if isinstance(ds, ShardStream):  # its own sampler: set_epoch positions the stream
        sampler, per_rank = ds, ds.samples_per_rank
        loader = DeviceBatches(build_stream_loader(ds, batch_size, workers, pin_memory=pin), device, mean, std)
    elif store is not None:
        images, labels = load_uint8_tensor(ds, num_workers=workers, progress=progress)
        loader = GPUBatchLoader(
            images.to(device),
            labels,
            batch_size,
            sampler,
            img_size,
            mean,
            std,
            min_scale=data.min_scale,
            hflip=data.hflip,
            seed=seed,
        )
        description = "GPU-resident"
    elif resolve_decode(data.decode) == "gpu":  # DataConfig allows it for image folders only
        loader = JPEGDecodeLoader(
            ds,
            batch_size,
            sampler,
            img_size,
            mean,
            std,
            device,
            num_workers=workers,
            min_scale=data.min_scale,
            hflip=data.hflip,
        )
        description = f"{workers} workers read files, JPEGs decoded on {device}"
    else:
        loader = DeviceBatches(build_loader(ds, batch_size, sampler, workers, pin_memory=pin), device, mean, std)
    if data.augment != "random_crop":
        description += f", data.augment={data.augment}"
    return TrainingData(
        dataset=ds,
        sampler=sampler,
        loader=loader,
        batches_per_epoch=per_rank // batch_size,
        gpu_resident=store is not None,
        description=description,
        transform=transform,
    )
