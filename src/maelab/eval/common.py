"""Pieces shared by the evaluation protocols: the encoder source, labeled data, run outputs.

Every protocol reads its encoder with :func:`load_encoder_model` (anything
:func:`maelab.engine.checkpoint.load_pretrained` accepts: a pre-training run directory, a
maelab ``.pt``, an official MAE ``.pth``, an exported ``.safetensors``), builds labeled
train/test splits with :func:`labeled_dataset`, and ends with :func:`write_eval_json`.

Under ``torchrun`` (see :mod:`maelab.engine.distributed`) :func:`shard` gives each rank its
own slice of an evaluation split (``rank::world_size``, no padding, so nothing is counted
twice), :func:`maelab.engine.distributed.all_reduce_sum` adds per-rank counts, :func:`all_gather_interleaved` puts
per-rank rows back into dataset order (:func:`gather_interleaved_to_rank0`: on rank 0 only), and
:mod:`maelab.eval.metrics` turns summed counts into percentages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from maelab.config import DataConfig, ModelConfig, to_dict
from maelab.data import build_dataset, dataset_info, default_stats, eval_transform
from maelab.data.loader import SignalSafeDataLoader
from maelab.engine.distributed import DistInfo
from maelab.errors import CheckpointError, ConfigError, DataError
from maelab.io import write_json
from maelab.models.mae import MaskedAutoencoder

ARCH_FIELDS = (
    "encoder",
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "depths",
    "window_size",
    "num_heads",
    "mlp_ratio",
)
"""ModelConfig fields that must agree between a checkpoint and a requested ``model``."""


def load_encoder_model(
    checkpoint: str, model: str | None = None, model_args: dict[str, Any] | None = None, pool: str | None = None
) -> MaskedAutoencoder:
    """The pre-trained MAE behind ``checkpoint``; if ``model`` is given, its architecture must match; ``pool``
    (when given) must suit the encoder (no ``cls`` for a Swin).

    Raises:
        CheckpointError: missing/corrupt file, or an architecture other than ``model``'s.
        ConfigError: ``pool=cls`` for an encoder without a class token.
    """
    from maelab.engine.checkpoint import load_pretrained
    from maelab.eval.features import check_pool

    mae = load_pretrained(checkpoint)
    if pool is not None:
        check_pool(pool, has_class_token=mae.cfg.has_class_token)
    if model is not None:
        from maelab.models.registry import get_config

        check_architecture(mae.cfg, get_config(model, **dict(model_args or {})), checkpoint, model)
    return mae


def check_architecture(found: ModelConfig, expected: ModelConfig, source: str, model: str) -> None:
    """One-line :class:`CheckpointError` listing the fields where ``found`` differs from ``expected``."""
    diff = [
        f"{f}={getattr(found, f)!r} (model wants {getattr(expected, f)!r})"
        for f in ARCH_FIELDS
        if getattr(found, f) != getattr(expected, f)
    ]
    if diff:
        raise CheckpointError(
            f"{source}: checkpoint architecture does not match model={model!r}: "
            f"{', '.join(diff)}; drop --model or pick the preset it was trained with"
        )


def resolve_stats(data: DataConfig, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization (mean, std): ``data.mean/std`` or the defaults for ``in_chans`` channels."""
    mean_d, std_d = default_stats(in_chans)
    mean = tuple(data.mean or mean_d)
    std = tuple(data.std or std_d)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(
            f"invalid data.mean/std: need {in_chans} values each (the encoder has "
            f"in_chans={in_chans}), got {len(mean)} and {len(std)}"
        )
    return mean, std


def dataset_len(ds: Dataset) -> int:
    """Number of items of a map-style dataset (torch's ``Dataset`` type declares no ``__len__``)."""
    return len(cast(Sized, ds))


def labeled_dataset(
    data: DataConfig,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    train: bool,
    transform: Callable[[Any], Any],
    seed: int,
    protocol: str,
) -> tuple[Dataset, int]:
    """``build_dataset`` for a supervised protocol: ``(dataset, num_classes)``.

    Raises:
        DataError: the dataset has no labels (e.g. a plain tree of images) or is empty.
    """
    ds = build_dataset(data, img_size=img_size, in_chans=in_chans, train=train, transform=transform, seed=seed)
    num_classes, labeled = dataset_info(ds)
    split = "training" if train else "evaluation"
    if not labeled or num_classes is None:
        raise DataError(
            f"dataset {data.name!r} ({split} split) has no labels: {protocol} needs a labeled dataset "
            "(an image folder with one subfolder per class, synthetic, cifar10, cifar100, stl10)"
        )
    if dataset_len(ds) == 0:  # pragma: no cover - build_dataset already refuses empty folders
        raise DataError(f"dataset {data.name!r} ({split} split) is empty")
    return ds, num_classes


def train_and_test_sets(
    data: DataConfig,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    train_transform: Callable[[Any], Any],
    test_transform: Callable[[Any], Any],
    seed: int,
    protocol: str,
) -> tuple[Dataset, Dataset, int]:
    """Labeled training and evaluation splits with the same class count: ``(train, test, num_classes)``."""
    train_ds, n_train = labeled_dataset(
        data, img_size=img_size, in_chans=in_chans, train=True, transform=train_transform, seed=seed, protocol=protocol
    )
    test_ds, n_test = labeled_dataset(
        data, img_size=img_size, in_chans=in_chans, train=False, transform=test_transform, seed=seed, protocol=protocol
    )
    if n_test != n_train:
        raise DataError(
            f"dataset {data.name!r}: the evaluation split has {n_test} classes but the training "
            f"split has {n_train}; both need the same class folders"
        )
    return train_ds, test_ds, n_train


def frozen_encoder_setup(
    cfg: Any,
) -> tuple[DistInfo, torch.device, torch.dtype, MaskedAutoencoder, Callable[[Any], Any]]:
    """Start of a frozen-feature command (``knn``, ``embed``): ``(info, device, dtype, mae, transform)``.

    Joins torchrun's process group (if any), seeds, loads the checkpoint's MAE and builds its
    evaluation transform from ``cfg.data`` (crop_pct, mean/std)."""
    from maelab.engine.distributed import setup_process
    from maelab.engine.runtime import seed_everything

    info, device, dtype = setup_process(cfg.device, cfg.precision)
    seed_everything(cfg.seed)
    mae = load_encoder_model(cfg.checkpoint, cfg.model, cfg.model_args, cfg.pool)
    mean, std = resolve_stats(cfg.data, mae.cfg.in_chans)
    return info, device, dtype, mae, eval_transform(mae.cfg.img_size, mean, std, crop_pct=cfg.data.crop_pct)


def plain_loader(
    ds: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Sequential, non-dropping loader for evaluation and feature extraction (``collate_fn``: torch's default)."""
    return SignalSafeDataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate_fn,
    )


# ---------------------------------------------------------------------------------- torchrun helpers
def shard(ds: Dataset, info: DistInfo) -> Dataset:
    """This rank's items of an evaluation split: indices ``rank, rank + W, ...`` (W = world size).

    Unlike ``DistributedSampler`` nothing is padded: the shards are disjoint and together hold
    every item exactly once, so summed counts are exact. A single process gets ``ds`` itself."""
    if not info.enabled:
        return ds
    return Subset(ds, range(info.rank, dataset_len(ds), info.world_size))


def _padded_shard(local: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """This rank's rows [n, ...] padded with zero rows to the longest shard: [ceil(total / world), ...]."""
    padded = local.new_zeros((-(-total // world), *local.shape[1:]))
    padded[: local.shape[0]] = local
    return padded


def _interleaved(shards: torch.Tensor, total: int) -> torch.Tensor:
    """Padded shards [world, longest, ...] (rank r's row i is item ``r + i * world``) -> [total, ...] in dataset
    order; the padding rows come last and are cut."""
    return shards.transpose(0, 1).reshape(-1, *shards.shape[2:])[:total]


def all_gather_interleaved(local: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Rows of :func:`shard`-ed data from every rank, back in dataset order, on every rank: [total, ...].

    ``local`` holds this rank's rows (items ``rank::world_size``); shards differ in length by at
    most one row, so each is padded to the longest for ``all_gather`` and cut back afterwards."""
    if not info.enabled:
        return local
    import torch.distributed as dist

    padded = _padded_shard(local, total, info.world_size)
    shards = padded.new_empty((info.world_size, *padded.shape))
    dist.all_gather(list(shards.unbind(0)), padded)
    return _interleaved(shards, total)


def gather_interleaved_to_rank0(
    local: torch.Tensor, total: int, info: DistInfo, group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor | None:
    """Rows of :func:`shard`-ed data from every rank, in dataset order on rank 0's CPU: [total, ...]; None on
    the other ranks.

    Unlike :func:`all_gather_interleaved` only rank 0 receives, and through the CPU: every rank moves its rows
    [n, ...] to the CPU, so no GPU and no other rank holds more than its own shard. ``group``: a group for CPU
    tensors (:func:`maelab.engine.distributed.cpu_group`; None = the default group, gloo)."""
    local = local.cpu()
    if not info.enabled:
        return local
    import torch.distributed as dist

    padded = _padded_shard(local, total, info.world_size)
    if not info.is_main:
        dist.gather(padded, None, dst=0, group=group)
        return None
    shards = padded.new_empty((info.world_size, *padded.shape))
    dist.gather(padded, list(shards.unbind(0)), dst=0, group=group)
    return _interleaved(shards, total)


def checkpoint_source(cfg: Any) -> str:
    """What the encoder came from, for eval.json: the resolved checkpoint path or 'scratch'."""
    if getattr(cfg, "from_scratch", False):
        return "scratch"
    p = Path(cfg.checkpoint)
    return str(p.resolve()) if p.exists() else str(p)


def write_eval_json(output: str | Path, protocol: str, metrics: dict[str, Any], cfg: Any, **extra: Any) -> Path:
    """``eval.json`` in ``output``: protocol, metrics, encoder source, resolved config and extras."""
    from maelab import __version__

    record = {
        "protocol": protocol,
        "metrics": metrics,
        "checkpoint": checkpoint_source(cfg),
        "dataset": cfg.data.name,
        **extra,
        "config": to_dict(cfg),
        "maelab_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return write_json(record, Path(output) / "eval.json")


def reset_metrics(path: str | Path, epochs_done: int = 0) -> None:
    """Keep only the ``metrics.jsonl`` records of the first ``epochs_done`` epochs (0: start afresh)."""
    from maelab.engine.metrics import read_records, write_records

    p = Path(path)
    if not p.exists():
        return
    records = [r for r in read_records(p) if r.get("epoch", 0) <= epochs_done] if epochs_done > 0 else []
    write_records(p, records)
