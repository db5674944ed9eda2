"""Classification metrics, once for every protocol: top-k counts and accuracies, their sums over ranks, and the
evaluation of a classifier on a (sharded) split."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from maelab.engine.distributed import DistInfo, all_reduce_sum
from maelab.engine.runtime import autocast
from maelab.errors import DataError


def percent_metrics(correct: dict[str, torch.Tensor | float], n: int) -> dict[str, float]:
    """``{'top1': 100 * correct / n, ...}`` from (summed) correct counts."""
    return {k: 100.0 * float(v) / n for k, v in correct.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, for each k < num_classes (top-k of all classes is trivially 100)."""
    labels = labels.to(scores.device).long()
    out: dict[str, float] = {}
    num_classes = scores.shape[1]
    for k in ks:
        if k > 1 and k >= num_classes:
            continue
        pred = scores.topk(k, dim=1).indices
        out[f"top{k}"] = (pred == labels[:, None]).any(dim=1).float().mean().item() * 100.0
    return out


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5), num_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """Numbers of correct top-k predictions (int64 tensors on ``scores.device``), for the same k
    as :func:`topk_accuracy`; counts of disjoint shards can be summed (``all_reduce``)."""
    labels = labels.to(scores.device).long()
    num_classes = scores.shape[1] if num_classes is None else num_classes
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        if k > 1 and k >= num_classes:
            continue
        if scores.shape[0] == 0:
            out[f"top{k}"] = torch.zeros((), dtype=torch.long, device=scores.device)
            continue
        pred = scores.topk(k, dim=1).indices
        out[f"top{k}"] = (pred == labels[:, None]).any(dim=1).sum()
    return out


def summed_topk(
    correct: dict[str, torch.Tensor], n: int, info: DistInfo, extra: dict[str, float] | None = None
) -> tuple[dict[str, float], int]:
    """Percentages from per-rank ``topk_correct`` counts, ``n`` items and optional sums
    (e.g. a loss sum) added over ranks: ``({'top1': %, ..., **extra sums}, total n)``."""
    keys = list(correct)
    extra = extra or {}
    packed = [float(correct[k]) for k in keys] + [float(v) for v in extra.values()] + [float(n)]
    if info.enabled:  # one collective for everything, on the backend's device (NCCL: the GPU)
        device = next(iter(correct.values())).device if correct else torch.device("cpu")
        packed = all_reduce_sum(torch.tensor(packed, dtype=torch.float64, device=device), info).tolist()
    total = round(packed[-1])
    out: dict[str, float] = {}
    if total > 0:
        out = percent_metrics(dict(zip(keys, packed[: len(keys)])), total)
    out.update({k: packed[len(keys) + i] for i, k in enumerate(extra)})
    return out, total


@torch.no_grad()
def evaluate_classifier(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[Any, Any]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    info: DistInfo | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 (percent; top-5 only with more than 5 classes), mean cross-entropy (``val_loss``) and
    ``num_images`` of ``logits_of`` over ``batches`` of (inputs, labels).

    The inputs go to ``device`` and through ``logits_of`` under autocast. Under torchrun (``info.enabled``)
    ``batches`` hold this rank's shard (:func:`maelab.eval.common.shard`: disjoint, not padded) and the counts,
    loss sums and image counts are added over ranks, so every rank returns the metrics of the whole split.
    ``num_classes`` defaults to the logits' width (it is needed when a rank may hold no images).
    """
    info = info or DistInfo()
    correct: dict[str, torch.Tensor] = {}
    loss_sum, n = 0.0, 0
    for inputs, target in tqdm(
        batches, disable=not (progress and info.is_main), desc="eval", leave=False, dynamic_ncols=True
    ):
        inputs = inputs.to(device, non_blocking=True)
        target = torch.as_tensor(target).to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = logits_of(inputs)
        logits = logits.float()
        num_classes = num_classes or logits.shape[1]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        for key, count in topk_correct(logits, target, num_classes=num_classes).items():
            correct[key] = correct[key] + count if key in correct else count
        n += inputs.shape[0]
    if not correct:  # an empty split (or an empty shard, which still joins the sums)
        if info.enabled and num_classes is None:
            raise ValueError("evaluate_classifier() under torchrun needs num_classes when a rank holds no images")
        correct = {
            f"top{k}": torch.zeros((), dtype=torch.long, device=device)
            for k in (1, 5)
            if k == 1 or k < (num_classes or 0)
        }
    out, total = summed_topk(correct, n, info, extra={"val_loss": loss_sum})
    if total == 0:
        raise DataError("the evaluation split is empty")
    out["val_loss"] /= total
    return {**out, "num_images": total}
