"""The one frozen-feature builder every protocol shares (kNN, the linear probe's cache).

A feature is the encoder's output for the full, unmasked image, pooled one of two ways:

- ``cls``: the class token after the encoder's final norm (the paper's linear probe);
- ``avg``: the mean of the patch tokens after the final norm.

``encoder`` is the timm encoder of a pre-trained model (``mae.encoder``): a ``VisionTransformer``
(``forward_features(imgs) -> [B, prefix + L, D]``) or a ``SwinTransformer`` (``-> [B, h, w, D]``, no class token:
``avg`` only).

:func:`extract_split` is the ``torchrun``-aware entry point: each rank encodes its own shard
of a split and the shards are all-gathered back into dataset order (or kept local).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from maelab.config import POOLS
from maelab.engine.distributed import DistInfo
from maelab.engine.runtime import autocast
from maelab.errors import ConfigError
from maelab.eval.common import all_gather_interleaved, dataset_len, plain_loader, shard


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """tokens [B, prefix + L, D] (or a Swin's map [B, h, w, D], no prefix) -> [B, D]: the first (class) token, or
    the mean of the patch tokens."""
    if tokens.dim() == 4:
        check_pool(pool, has_class_token=False)
        return tokens.mean(dim=(1, 2))
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def check_pool(pool: str, has_class_token: bool) -> None:
    """One-line ConfigError for ``pool=cls`` on an encoder without a class token (Swin)."""
    if pool == "cls" and not has_class_token:
        raise ConfigError("invalid pool='cls': a Swin encoder has no class token; use pool=avg (--pool avg)")


def feature_dim(encoder: nn.Module) -> int:
    """D of the pooled features: the encoder's width (timm ``num_features``)."""
    return int(getattr(encoder, "num_features", getattr(encoder, "embed_dim", 0)))


def encode(encoder: nn.Module, imgs: torch.Tensor, pool: str) -> torch.Tensor:
    """imgs [B, C, H, W] -> pooled features [B, D] (grad and mode are the caller's business)."""
    # a timm model's method (nn.Module.__getattr__ would type it Tensor | Module)
    forward_features = cast(Callable[[torch.Tensor], torch.Tensor], encoder.forward_features)
    tokens = forward_features(imgs)
    return pool_tokens(tokens, pool, getattr(encoder, "num_prefix_tokens", 1))


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: DataLoader,
    pool: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every item of ``loader``, in loader order.

    The encoder runs in eval mode without gradients (its mode is restored afterwards). Empty
    batches (a collate that dropped every item, e.g. unreadable images) are passed over.

    Returns:
        feats: float32 [N, D] on ``device``; labels: int64 [N] on ``device`` (N = 0 for an empty loader).
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    n_total = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    bar = tqdm(total=n_total, disable=not progress, desc=desc, unit="img", dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    try:
        for imgs, target in loader:
            if imgs.shape[0] == 0:
                continue
            imgs = imgs.to(device, non_blocking=True)
            with autocast(device, dtype):
                f = encode(encoder, imgs, pool)
            feats.append(f.float())
            labels.append(torch.as_tensor(target).to(device=device, dtype=torch.long))
            bar.update(imgs.shape[0])
            if progress:
                bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        bar.close()
        encoder.train(was_training)
    if not feats:
        return (torch.zeros(0, feature_dim(encoder), device=device), torch.zeros(0, dtype=torch.long, device=device))
    return torch.cat(feats), torch.cat(labels)


def extract_split(
    encoder: nn.Module,
    ds: Dataset,
    pool: str,
    device: torch.device | str,
    *,
    batch_size: int,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    info: DistInfo | None = None,
    gather: bool = True,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features and labels of every item of ``ds``, in dataset order.

    Under torchrun (``info.enabled``) each rank encodes only its shard (items
    ``rank::world_size``, :func:`maelab.eval.common.shard`); with ``gather`` the shards are
    all-gathered so that every rank holds the whole split, else each rank keeps its shard.
    A single process is :func:`extract_features` over a sequential loader.
    """
    info = info or DistInfo()
    device = torch.device(device)
    # fewer items than ranks: a rank may have nothing to encode ([0, D]) but still joins the gather
    loader = plain_loader(shard(ds, info), batch_size, num_workers, device)
    feats, labels = extract_features(
        encoder, loader, pool, device, dtype, progress=progress and info.is_main, desc=desc
    )
    if gather and info.enabled:
        total = dataset_len(ds)
        feats = all_gather_interleaved(feats, total, info)
        labels = all_gather_interleaved(labels, total, info)
    return feats, labels
