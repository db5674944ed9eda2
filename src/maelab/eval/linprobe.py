"""Linear probing (and partial fine-tuning) of a frozen pre-trained encoder, as in the paper.

The probe is ``BatchNorm1d(D, affine=False, eps=1e-6) + Linear(D, classes)`` on the
encoder's class token (paper) or averaged patch tokens, trained with LARS (paper; timm's
``Lars`` with the official MAE rule: trust-ratio adaptation and weight decay on matrices
only), SGD or AdamW, with warmup + cosine lr and ``lr = base_lr * batch / 256``.

Two equivalent paths:

- **cache** (``augment: false``, ``train_blocks: 0``): the features of every training and
  test image are extracted once and the head is trained on them;
- **streaming**: images go through the encoder at every step (needed with augmentation or
  when the last ``train_blocks`` blocks are tuned, paper Fig. 9).

Both visit the same samples in the same order (``ResumableSampler``), start from the same
head (seeded), and run the head in fp32, so without augmentation they give the same head.
The encoder's frozen part never changes: it stays in eval mode with ``requires_grad=False``.

Under ``torchrun`` the global batch is ``batch_size x world_size`` (and so is the lr's):

- streaming: each rank reads its interleaved slice of the epoch's permutation; the head (or,
  with ``train_blocks > 0``, the whole probe) is wrapped in ``DistributedDataParallel`` and
  the head's BatchNorm normalizes with the statistics of the global batch
  (:class:`GlobalBatchNorm1d`), so N processes compute what one process does with the
  global batch; the test split is evaluated in disjoint shards whose counts are summed;
- cache: each rank extracts a shard of the features, the shards are all-gathered, and every
  rank trains the (cheap) head identically on the global batches.

Only rank 0 writes checkpoints, metrics and ``eval.json`` and shows progress.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from maelab.config import batch_summary, save_yaml, to_dict
from maelab.data import pretrain_transform
from maelab.data.loader import ResumableSampler, build_loader
from maelab.engine.checkpoint import LAST, atomic_save
from maelab.engine.distributed import DistInfo, all_reduce_mean, barrier, setup_process
from maelab.engine.metrics import MetricsLog
from maelab.engine.optim import set_lr
from maelab.engine.runtime import (
    autocast,
    explain_out_of_memory,
    seed_everything,
)
from maelab.engine.schedule import lr_at
from maelab.errors import DataError, NonFiniteLossError
from maelab.eval.classifier import frozen_to_eval, set_trainable_blocks
from maelab.eval.common import (
    evaluation_transform,
    load_encoder_model,
    plain_loader,
    reset_metrics,
    resolve_stats,
    shard,
    train_and_test_sets,
    write_eval_json,
)
from maelab.eval.config import LinprobeConfig
from maelab.eval.features import encode, extract_split
from maelab.eval.knn import summed_topk, topk_correct

log = logging.getLogger(__name__)

BEST = "best.pt"


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with autograd: the gradient of a sum that every rank uses is the sum of
    the ranks' gradients (the same rule as ``SyncBatchNorm``'s backward)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are those of the global batch (every rank's).

    Like ``SyncBatchNorm``, but for any backend and device (gloo on CPU too): the sums are
    all-reduced with autograd, so gradients flow across ranks as they would through one
    process's batch. Running statistics follow ``BatchNorm1d``'s rule with the global count
    (identical on every rank). Outside a multi-process group, or in eval mode, it is exactly
    ``BatchNorm1d``; its state dict is the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        sums = all_reduce(torch.cat([x.sum(0), x.new_full((1,), float(x.shape[0]))]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centered = x - mean
        var = all_reduce((centered * centered).sum(0)) / n  # biased, as BatchNorm normalizes
        out = centered * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None  # type: ignore[arg-type]
                    else self.momentum
                )
                unbiased = var.detach() * n / torch.clamp(n - 1, min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)  # type: ignore[union-attr]
        return out

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d) -> GlobalBatchNorm1d:
        """The same layer (hyper-parameters, weights, running statistics) with global statistics."""
        new = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,  # type: ignore[arg-type]
            track_running_stats=bn.track_running_stats,
        )
        state = bn.state_dict()
        ref = next(iter(state.values()), None)
        if ref is not None:
            new = new.to(ref.device)
        new.load_state_dict(state)
        return new


class LinearProbe(nn.Module):
    """Encoder (frozen but for its last ``train_blocks`` blocks) + pooling + BN + Linear head."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        pool: str = "cls",
        train_blocks: int = 0,
        head_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.train_blocks = train_blocks
        dim = encoder.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=head_init_std)
        nn.init.zeros_(self.head[1].bias)
        set_trainable_blocks(self.encoder, train_blocks)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if mode and self.train_blocks == 0:
            self.encoder.eval()
        elif mode:
            frozen_to_eval(self.encoder, self.train_blocks)
        return self

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> pooled encoder features [B, D]."""
        return encode(self.encoder, imgs, self.pool)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs -> logits; the encoder follows any surrounding autocast, the head always runs in fp32."""
        feats = self.features(imgs).float()
        with torch.autocast(feats.device.type, enabled=False):
            return self.head(feats)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The head and any tuned encoder parameters (all that differs from the checkpoint)."""
        tuned = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k.startswith("head.") or k in tuned}


def probe_param_groups(model: nn.Module, weight_decay: float, lars: bool = False) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices (weight decay; LARS adaptation) and 1-D
    parameters such as biases and norms (no weight decay, no LARS adaptation), as the official LARS."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lars:
        groups[0]["always_adapt"] = True
        groups[1]["always_adapt"] = False
    return [g for g in groups if g["params"]]


def build_probe_optimizer(model: nn.Module, cfg: LinprobeConfig, lr: float) -> torch.optim.Optimizer:
    """LARS (timm, trust coefficient 1e-3, momentum), SGD (momentum) or AdamW over the trainable parameters."""
    if cfg.optimizer == "lars":
        from timm.optim import Lars

        return Lars(
            probe_param_groups(model, cfg.weight_decay, lars=True), lr=lr, momentum=cfg.momentum, trust_coeff=0.001
        )
    groups = probe_param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))


@dataclass
class LinprobeResult:
    output: Path
    metrics: dict[str, Any]
    cached: bool


class LinearProber:
    """State of one probing run; ``run()`` trains the head and writes ``eval.json``."""

    def __init__(self, cfg: LinprobeConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.dist, self.device, self.dtype = setup_process(cfg.device, cfg.precision)
        self.is_main = self.dist.is_main
        self.world_size = self.dist.world_size
        mae = load_encoder_model(cfg.checkpoint, cfg.model, cfg.model_args)  # type: ignore[arg-type]
        self.model_cfg = mcfg = mae.cfg
        self.mean, self.std = resolve_stats(cfg.data, mcfg.in_chans)
        test_tf = evaluation_transform(mcfg.img_size, self.mean, self.std, cfg.data.crop_pct)
        train_tf = (
            pretrain_transform(
                mcfg.img_size, self.mean, self.std, min_scale=cfg.crop_min_scale, hflip=cfg.data.hflip, crop=cfg.crop
            )
            if cfg.augment
            else test_tf
        )
        self.train_ds, self.val_ds, self.num_classes = train_and_test_sets(
            cfg.data,
            img_size=mcfg.img_size,
            in_chans=mcfg.in_chans,
            train_transform=train_tf,
            test_transform=test_tf,
            seed=cfg.seed,
            protocol="linprobe",
        )
        self.global_batch = cfg.batch_size * self.world_size
        if len(self.train_ds) < self.global_batch:
            what = (
                f"batch_size x world_size = {self.global_batch} ({self.world_size} processes)"
                if self.dist.enabled
                else f"batch_size={cfg.batch_size}"
            )
            raise DataError(
                f"dataset {cfg.data.name!r} has {len(self.train_ds)} training images, fewer than "
                f"{what}: lower --batch-size"
            )
        seed_everything(cfg.seed)  # the head's init depends on the seed only (the same on every rank)
        self.model = LinearProbe(mae.encoder, self.num_classes, cfg.pool, cfg.train_blocks).to(self.device)
        self.cached = cfg.uses_cache
        self.peak_lr = cfg.resolved_lr(self.world_size)
        self.optimizer = build_probe_optimizer(self.model, cfg, self.peak_lr)
        # streaming: this rank's interleaved slice of each epoch's permutation; the cache path reads the
        # global order in global batches (the union of the ranks' batches: the same samples)
        self.sampler = ResumableSampler(
            len(self.train_ds), seed=cfg.seed, shuffle=True, rank=self.dist.rank, world_size=self.world_size
        )
        self.global_sampler = ResumableSampler(len(self.train_ds), seed=cfg.seed, shuffle=True)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss()
        self.step = 0
        self.epoch = 0
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            reset_metrics(self.metrics.path)
            save_yaml(cfg, self.out / "config.yaml")
            log.info(self.summary())

        # what a training step calls: the head on features, or the whole probe on images when blocks
        # are tuned while streaming; under torchrun their DDP wrappers (cache: every rank alike, no DDP)
        self.end_to_end = not self.cached and cfg.train_blocks > 0
        self.head_forward: nn.Module = self.model.head
        self.probe_forward: nn.Module = self.model
        if self.dist.enabled and not self.cached:
            from torch.nn.parallel import DistributedDataParallel

            self.model.head[0] = GlobalBatchNorm1d.from_batchnorm(self.model.head[0])  # type: ignore[arg-type]
            ids = [self.device.index] if self.device.type == "cuda" else None
            if self.end_to_end:
                self.probe_forward = DistributedDataParallel(self.model, device_ids=ids)
            else:
                self.head_forward = DistributedDataParallel(self.model.head, device_ids=ids)

    def summary(self) -> str:
        """One line: what is probed on what, with which batch, lr and length."""
        cfg = self.cfg
        what = "linear probe" if cfg.train_blocks == 0 else f"partial fine-tune ({cfg.train_blocks} blocks)"
        return (
            f"{what} of {cfg.checkpoint} ({cfg.pool} features, {cfg.optimizer}) on {cfg.data.name!r} "
            f"({len(self.train_ds)} images, {self.num_classes} classes{', cached features' if self.cached else ''}"
            f"); {batch_summary(cfg.batch_size, None, self.world_size, self.peak_lr)}, {cfg.epochs} epochs "
            f"({cfg.warmup_epochs:g} warmup) = {self.total_steps} steps, {self.device}; output {self.out}"
        )

    # ------------------------------------------------------------------ data
    def _extract(self, ds: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the whole split on every rank (under torchrun: sharded, then all-gathered)."""
        return extract_split(
            self.model.encoder,
            ds,
            self.cfg.pool,
            self.device,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.data.num_workers,
            dtype=self.dtype,
            info=self.dist,
            progress=self.progress,
            desc=desc,
        )

    def _cached_batches(self, feats: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The streaming loaders' global batches, read from the cache: same samples, last partial batch dropped."""
        order = torch.tensor(self.global_sampler.order(), dtype=torch.long, device=feats.device)
        bs = self.global_batch
        for i in range(self.steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            yield feats[idx], labels[idx]

    def _streamed_batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images -> (features, labels) with the frozen encoder; (images, labels) when blocks are tuned
        (the probe then runs end to end in :meth:`train_step`)."""
        for imgs, labels in loader:
            imgs = imgs.to(self.device, non_blocking=True)
            labels = torch.as_tensor(labels).to(self.device, non_blocking=True)  # pinned by the loader
            if self.end_to_end:
                yield imgs, labels
                continue
            with torch.no_grad(), autocast(self.device, self.dtype):
                feats = self.model.features(imgs)
            yield feats.float(), labels

    # ------------------------------------------------------------------ training
    def lr(self) -> float:
        return lr_at(
            self.step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.peak_lr,
            min_lr=self.cfg.min_lr,
        )

    def train_step(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One step on features (or on images when blocks are tuned while streaming)."""
        set_lr(self.optimizer, self.lr())
        if self.end_to_end:
            with autocast(self.device, self.dtype):
                logits = self.probe_forward(feats)  # LinearProbe.forward: the head in fp32
        else:
            logits = self.head_forward(feats)  # fp32 head in both paths
        loss = self.criterion(logits.float(), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, val_cache: tuple[torch.Tensor, torch.Tensor] | None, val_loader: Any) -> dict[str, float]:
        """Top-1 / top-5 (percent) and loss on the test split, from cached features when the encoder is frozen.

        The cache holds the whole split on every rank; a streamed ``val_loader`` holds this rank's
        shard, and the counts are summed over ranks. Every rank returns the same metrics."""
        self.model.eval()
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        reduce_over = DistInfo()
        if val_cache is not None:
            feats, labels = val_cache
            for i in range(0, feats.shape[0], 4096):
                chunks.append((self.model.head(feats[i : i + 4096]), labels[i : i + 4096]))
        else:
            reduce_over = self.dist
            for imgs, labels in val_loader:
                imgs = imgs.to(self.device, non_blocking=True)
                with autocast(self.device, self.dtype):
                    feats = self.model.features(imgs)
                chunks.append(
                    (self.model.head(feats.float()), torch.as_tensor(labels).to(self.device, non_blocking=True))
                )
        self.model.train()
        if chunks:
            logits = torch.cat([c[0] for c in chunks]).float()
            labels = torch.cat([c[1] for c in chunks])
        else:  # an empty shard (fewer test images than ranks) still joins the sums
            logits = torch.zeros(0, self.num_classes, device=self.device)
            labels = torch.zeros(0, dtype=torch.long, device=self.device)
        loss_sum = nn.functional.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
        out, total = summed_topk(
            topk_correct(logits, labels, num_classes=self.num_classes),
            len(labels),
            reduce_over,
            extra={"val_loss": loss_sum},
        )
        if total == 0:
            raise DataError("the evaluation split is empty")
        out["val_loss"] /= total
        return out

    def run(self) -> LinprobeResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        frozen = cfg.train_blocks == 0
        train_cache = self._extract(self.train_ds, "train features") if self.cached else None
        val_cache = self._extract(self.val_ds, "test features") if frozen else None
        val_loader = (
            None
            if frozen
            else plain_loader(shard(self.val_ds, self.dist), cfg.batch_size, cfg.data.num_workers, self.device)
        )
        loader = (
            None
            if self.cached
            else build_loader(
                self.train_ds, cfg.batch_size, self.sampler, cfg.data.num_workers, pin_memory=self.device.type == "cuda"
            )
        )
        best: dict[str, Any] = {"top1": -1.0, "epoch": 0}
        last: dict[str, Any] = {}
        check_every = 1 if self.device.type == "cpu" else cfg.log_every
        bar = tqdm(
            total=self.total_steps,
            disable=not (self.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self.model.train()
        while self.epoch < cfg.epochs:
            bar.set_description(f"linprobe {self.epoch + 1}/{cfg.epochs}{' (cached)' if self.cached else ''}")
            self.sampler.set_epoch(self.epoch)
            self.global_sampler.set_epoch(self.epoch)
            batches = self._cached_batches(*train_cache) if train_cache is not None else self._streamed_batches(loader)
            t_epoch, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
            window, window_steps, t_window = torch.zeros((), device=self.device), 0, time.perf_counter()
            for done, (feats, labels) in enumerate(batches, start=1):
                with explain_out_of_memory(cfg, self.device):
                    loss = self.train_step(feats, labels)
                seen += feats.shape[0] * (1 if self.cached else self.world_size)
                window += loss
                window_steps += 1
                if self.step % check_every == 0 or self.step % cfg.log_every == 0 or done == self.steps_per_epoch:
                    value = all_reduce_mean(window, self.dist).item() / window_steps  # the same on every rank
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"non-finite probe loss ({value}) at step {self.step}; try a lower lr")
                    loss_sum += value * window_steps
                    loss_n += window_steps
                    rate = window_steps * self.global_batch / max(time.perf_counter() - t_window, 1e-9)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.lr():.2e}", img_s=f"{rate:.0f}")
                    window, window_steps, t_window = torch.zeros((), device=self.device), 0, time.perf_counter()
                bar.update(1)
                if done >= self.steps_per_epoch:
                    break
            elapsed = time.perf_counter() - t_epoch
            self.epoch += 1
            record: dict[str, Any] = {
                "epoch": self.epoch,
                "step": self.step,
                "loss": loss_sum / max(loss_n, 1),
                "lr": self.lr(),
                "img_per_s": seen / max(elapsed, 1e-9),
                "epoch_time_s": elapsed,
            }
            final = self.epoch == cfg.epochs
            if final or self.epoch % cfg.eval_every == 0:
                last = self.evaluate(val_cache, val_loader)
                record.update(last)
                if last["top1"] > best["top1"]:
                    best = {"top1": last["top1"], "epoch": self.epoch}
                    if self.is_main:
                        atomic_save(self._state(), self.ckpt_dir / BEST)
                record["best_top1"] = best["top1"]
            record["time"] = time.time()
            if self.is_main:
                self.metrics.append(record)
                atomic_save(self._state(), self.ckpt_dir / LAST)
        bar.close()
        metrics = {
            **last,
            "best_top1": best["top1"],
            "best_epoch": best["epoch"],
            "epochs": self.epoch,
            "steps": self.step,
        }
        if self.is_main:
            write_eval_json(
                self.out,
                "linprobe",
                metrics,
                cfg,
                num_classes=self.num_classes,
                num_train=len(self.train_ds),
                num_test=len(self.val_ds),
                pool=cfg.pool,
                train_blocks=cfg.train_blocks,
                cached_features=self.cached,
                seconds=time.perf_counter() - t_start,
                world_size=self.world_size,
            )
        barrier(self.dist)  # the outputs exist when any rank returns
        return LinprobeResult(self.out, metrics, self.cached)

    def _state(self) -> dict[str, Any]:
        return {
            "kind": "linprobe",
            "probe": self.model.trainable_state_dict(),
            "num_classes": self.num_classes,
            "encoder_config": to_dict(self.model_cfg),
            "config": to_dict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
        }


def linprobe(cfg: LinprobeConfig, progress: bool = True) -> LinprobeResult:
    """Linear probe (or partial fine-tune) as described by ``cfg``; see :class:`LinearProber`."""
    return LinearProber(cfg, progress=progress).run()
