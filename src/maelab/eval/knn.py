"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO protocol).

Features are L2-normalized; each test feature takes its ``k`` most cosine-similar training
features, and each neighbour votes for its class with weight ``exp(similarity / T)``.
Defaults: ``k = 20``, ``T = 0.07``. Test features are processed in chunks, so memory is
bounded by ``chunk x N_train`` similarities.

- :func:`knn_predict` / :func:`knn_accuracy`: the classifier on feature tensors.
- :func:`knn_monitor`: kNN top-1 of a MaskedAutoencoder during pre-training.
- :func:`run_knn`: the ``maelab knn`` command (writes ``eval.json``). Under ``torchrun`` each
  rank encodes a shard of both splits; the training features are all-gathered (every rank
  holds the whole memory bank), each rank classifies its own test shard, and the correct
  counts are summed over ranks. Rank 0 writes the outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from maelab.config import batch_summary, save_yaml
from maelab.data import dataset_info
from maelab.engine.distributed import barrier
from maelab.errors import DataError
from maelab.eval.common import (
    dataset_len,
    frozen_encoder_setup,
    plain_loader,
    train_and_test_sets,
    write_eval_json,
)
from maelab.eval.config import KnnConfig
from maelab.eval.features import extract_features, extract_split
from maelab.eval.metrics import summed_topk, topk_accuracy, topk_correct

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Class scores [M, num_classes] of the test features from their k nearest training features.

    train_feats [N, D], train_labels [N] (0..num_classes-1), test_feats [M, D]; features
    need not be normalized (they are L2-normalized here).
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk].to(train.device) @ train.T  # [b, N] cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=train.device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """``{'top1': %, 'top5': %}`` of weighted kNN (top5 only when there are more than 5 classes)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)


def _require_labels(ds: Dataset, what: str) -> int:
    num_classes, labeled = dataset_info(ds)
    if not labeled or num_classes is None:
        raise DataError(f"{what} has no labels: kNN monitoring needs a labeled dataset")
    return num_classes


@torch.no_grad()
def knn_monitor(
    model: Any,
    train_ds: Dataset,
    val_ds: Dataset,
    device: torch.device | str,
    k: int = 20,
    T: float = 0.07,
    batch_size: int = 256,
    pool: str = "cls",
    num_workers: int = 0,
    dtype: torch.dtype | None = None,
) -> float:
    """kNN top-1 accuracy (percent) of ``model.encoder``'s frozen features, for monitoring pre-training.

    ``train_ds`` / ``val_ds`` should use a deterministic transform (e.g. ``eval_transform``).
    The model's train/eval mode is restored afterwards. Raises DataError for unlabeled data.
    """
    device = torch.device(device)
    num_classes = max(
        _require_labels(train_ds, "the kNN training set"), _require_labels(val_ds, "the kNN validation set")
    )
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = model.encoder if hasattr(model, "encoder") else model
    train_f, train_y = extract_features(
        encoder, plain_loader(train_ds, batch_size, num_workers, device), pool, device, dtype
    )
    val_f, val_y = extract_features(encoder, plain_loader(val_ds, batch_size, num_workers, device), pool, device, dtype)
    return knn_accuracy(train_f, train_y, val_f, val_y, num_classes, k, T)["top1"]


@dataclass
class KnnResult:
    output: Path
    metrics: dict[str, float]


def run_knn(cfg: KnnConfig, progress: bool = True) -> KnnResult:
    """``maelab knn``: features of the train and test splits, weighted kNN, ``eval.json``."""
    info, device, dtype, mae, tf = frozen_encoder_setup(cfg)
    mcfg = mae.cfg
    train_ds, test_ds, num_classes = train_and_test_sets(
        cfg.data,
        img_size=mcfg.img_size,
        in_chans=mcfg.in_chans,
        train_transform=tf,
        test_transform=tf,
        seed=cfg.seed,
        protocol="knn",
    )
    out = Path(cfg.output)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        log.info(
            f"kNN (k={cfg.k}, T={cfg.temperature}, {cfg.pool} features) of {cfg.checkpoint} on {cfg.data.name!r} "
            f"({dataset_len(train_ds)} train / {dataset_len(test_ds)} test images, {num_classes} classes); "
            f"feature extraction {batch_summary(cfg.batch_size, None, info.world_size)}, {device}; output {out}"
        )
    encoder = mae.encoder.to(device)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "num_workers": cfg.data.num_workers,
        "dtype": dtype,
        "info": info,
        "progress": progress,
    }
    # the memory bank is needed whole on every rank; the queries stay sharded
    train_f, train_y = extract_split(encoder, train_ds, cfg.pool, device, desc="train features", **kw)
    test_f, test_y = extract_split(encoder, test_ds, cfg.pool, device, desc="test features", gather=False, **kw)
    if test_f.shape[0] > 0:
        scores = knn_predict(train_f, train_y, test_f, num_classes, cfg.k, cfg.temperature)
    else:  # more ranks than test images: this rank only joins the sum
        scores = torch.zeros(0, num_classes, device=device)
    acc, _ = summed_topk(topk_correct(scores, test_y, num_classes=num_classes), test_f.shape[0], info)
    metrics = {**acc, "k": cfg.k, "temperature": cfg.temperature}
    if info.is_main:
        write_eval_json(
            out,
            "knn",
            metrics,
            cfg,
            num_classes=num_classes,
            num_train=dataset_len(train_ds),
            num_test=dataset_len(test_ds),
            pool=cfg.pool,
            seconds=time.perf_counter() - t0,
            world_size=info.world_size,
        )
    barrier(info)  # eval.json exists when any rank returns
    return KnnResult(out, metrics)
