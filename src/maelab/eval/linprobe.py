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
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from maelab.config import batch_summary, to_dict
from maelab.data import eval_transform, pretrain_transform
from maelab.data.loader import ResumableSampler, build_loader
from maelab.engine.distributed import wrap_ddp
from maelab.engine.loop import Loop, Protocol, RunContext, RunResult, start_run
from maelab.engine.runtime import seed_everything
from maelab.engine.step import TrainStep
from maelab.errors import DataError
from maelab.eval.classifier import frozen_to_eval, set_trainable_blocks
from maelab.eval.common import (
    dataset_len,
    load_encoder_model,
    plain_loader,
    resolve_stats,
    shard,
    train_and_test_sets,
    write_eval_json,
)
from maelab.eval.config import LinprobeConfig
from maelab.eval.features import encode, extract_split, feature_dim
from maelab.eval.metrics import evaluate_classifier

log = logging.getLogger(__name__)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with autograd: the gradient of a sum that every rank uses is the sum of
    the ranks' gradients (the same rule as ``SyncBatchNorm``'s backward)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
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
            # registered together with running_mean (track_running_stats)
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * n / torch.clamp(n - 1, min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return out

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d) -> GlobalBatchNorm1d:
        """The same layer (hyper-parameters, weights, running statistics) with global statistics."""
        new = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
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
        dim = feature_dim(encoder)
        norm, linear = nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=head_init_std)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(norm, linear)
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


class LinearProbing(Protocol):
    """The linear probe (or partial fine-tune) on the one loop: cached or streamed features, the BN + linear head,
    LARS / SGD / AdamW; each evaluated epoch gives top-1 / top-5, and ``best.pt`` follows top-1. Checkpoints hold
    the head and any tuned encoder parameters only (the rest is the pre-trained checkpoint)."""

    kind = "linprobe"
    best_metric = "top1"
    resume_keys = {"pool": "cls", "train_blocks": 0}

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = cfg = ctx.cfg
        self.dist, self.device, self.dtype = ctx.dist, ctx.device, ctx.dtype
        self.t_start = time.perf_counter()
        world = self.dist.world_size
        mae = load_encoder_model(cfg.checkpoint, cfg.model, cfg.model_args, cfg.pool)
        self.model_cfg = mcfg = mae.cfg
        self.mean, self.std = resolve_stats(cfg.data, mcfg.in_chans)
        test_tf = eval_transform(mcfg.img_size, self.mean, self.std, cfg.data.crop_pct)
        train_tf = (
            pretrain_transform(
                mcfg.img_size, self.mean, self.std, min_scale=cfg.data.min_scale, hflip=cfg.data.hflip, crop=cfg.crop
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
        self.global_batch = cfg.batch_size * world
        if dataset_len(self.train_ds) < self.global_batch:
            what = (
                f"batch_size x world_size = {self.global_batch} ({world} processes)"
                if self.dist.enabled
                else f"batch_size={cfg.batch_size}"
            )
            raise DataError(
                f"dataset {cfg.data.name!r} has {dataset_len(self.train_ds)} training images, fewer than "
                f"{what}: lower --batch-size"
            )
        seed_everything(cfg.seed)  # the head's init depends on the seed only (the same on every rank)
        self.model: LinearProbe = LinearProbe(mae.encoder, self.num_classes, cfg.pool, cfg.train_blocks).to(self.device)
        self.cached = cfg.uses_cache
        self.frozen = cfg.train_blocks == 0
        self.end_to_end = not self.cached and not self.frozen
        self.optimizer = build_probe_optimizer(self.model, cfg, cfg.resolved_lr(world))
        # streaming: this rank's interleaved slice of each epoch's permutation; the cache path reads the
        # global order in global batches (the union of the ranks' batches: the same samples)
        self.sampler = ResumableSampler(
            dataset_len(self.train_ds), seed=cfg.seed, shuffle=True, rank=self.dist.rank, world_size=world
        )
        self.global_sampler = ResumableSampler(dataset_len(self.train_ds), seed=cfg.seed, shuffle=True)
        self.batches_per_epoch = len(self.sampler) // cfg.batch_size
        self.criterion = nn.CrossEntropyLoss()

        # what a training step calls: the head on features, or the whole probe on images when blocks
        # are tuned while streaming; under torchrun their DDP wrappers (cache: every rank alike, no DDP)
        forward: nn.Module = self.model if self.end_to_end else self.model.head
        if self.dist.enabled and not self.cached:
            self.model.head[0] = GlobalBatchNorm1d.from_batchnorm(self.model.head[0])  # type: ignore[arg-type]
            forward, _ = wrap_ddp(forward, self.dist, self.device)
        self.step_fn = TrainStep(forward, self._loss, self.optimizer, self.device, self.dtype, grad_clip=cfg.grad_clip)

        self.train_cache = self._extract(self.train_ds, "train features") if self.cached else None
        self.val_cache = self._extract(self.val_ds, "test features") if self.frozen else None
        self.val_loader = (
            None
            if self.frozen
            else plain_loader(shard(self.val_ds, self.dist), cfg.batch_size, cfg.data.num_workers, self.device)
        )
        self.loader = (
            None
            if self.cached
            else build_loader(
                self.train_ds, cfg.batch_size, self.sampler, cfg.data.num_workers, pin_memory=self.device.type == "cuda"
            )
        )

    def summary(self) -> str:
        cfg = self.cfg
        world = self.dist.world_size
        what = "linear probe" if cfg.train_blocks == 0 else f"partial fine-tune ({cfg.train_blocks} blocks)"
        steps = self.batches_per_epoch // cfg.accum_steps * cfg.epochs
        return (
            f"{what} of {cfg.checkpoint} ({cfg.pool} features, {cfg.optimizer}) on {cfg.data.name!r} "
            f"({dataset_len(self.train_ds)} images, {self.num_classes} classes"
            f"{', cached features' if self.cached else ''}); "
            f"{batch_summary(cfg.batch_size, cfg.accum_steps, world, cfg.resolved_lr(world))}, {cfg.epochs} "
            f"epochs ({cfg.warmup_epochs:g} warmup) = {steps} steps, {self.device}; output {self.ctx.out}"
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
            progress=self.ctx.progress,
            desc=desc,
        )

    def _cached_batches(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The streaming loaders' global batches, read from the cache: same samples, last partial batch dropped."""
        assert self.train_cache is not None
        feats, labels = self.train_cache
        order = torch.tensor(self.global_sampler.order(), dtype=torch.long, device=feats.device)
        bs = self.global_batch
        for i in range(start_batch, self.batches_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            yield feats[idx], labels[idx]

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable[Any]:
        if self.cached:
            self.global_sampler.set_epoch(epoch)
            return self._cached_batches(start_batch)
        self.sampler.set_epoch(epoch, start=start_batch * self.cfg.batch_size)
        assert self.loader is not None
        return self.loader

    def images_in(self, batch: Any) -> int:
        return int(batch[0].shape[0]) * (1 if self.cached else self.dist.world_size)

    # ------------------------------------------------------------------ loop hooks
    def _loss(self, forward: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the head on (cached or freshly computed) features, or of the whole probe on images
        when blocks are tuned; the head always runs in fp32."""
        inputs, labels = batch
        inputs = inputs.to(self.device, non_blocking=True)
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
        if self.end_to_end:
            logits = forward(inputs)  # LinearProbe.forward: the encoder under autocast, the head in fp32
        else:
            if not self.cached:
                with torch.no_grad():
                    inputs = self.model.features(inputs)
            with torch.autocast(self.device.type, enabled=False):
                logits = forward(inputs.float())
        return self.criterion(logits.float(), labels)

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        """Top-1 / top-5 (percent) and loss on the test split, from cached features when the encoder is frozen.

        The cache holds the whole split on every rank; a streamed loader holds this rank's shard, and the
        counts are summed over ranks. Every rank returns the same metrics."""
        if not (final or epoch % self.cfg.eval_every == 0):
            return {}
        self.model.eval()
        try:
            if self.val_cache is not None:
                feats, labels = self.val_cache
                chunks = [(feats[i : i + 4096], labels[i : i + 4096]) for i in range(0, feats.shape[0], 4096)]

                def head(f: torch.Tensor) -> torch.Tensor:
                    with torch.autocast(self.device.type, enabled=False):
                        return self.model.head(f.float())

                ev = evaluate_classifier(head, chunks, self.device, num_classes=self.num_classes)
            else:
                assert self.val_loader is not None
                ev = evaluate_classifier(
                    self.model,
                    self.val_loader,
                    self.device,
                    self.dtype,
                    info=self.dist,
                    num_classes=self.num_classes,
                )
        finally:
            self.model.train()
        ev.pop("num_images")
        return ev

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict[str, Any]:
        return self.model.trainable_state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state, strict=False)

    def extra_state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "encoder_config": to_dict(self.model_cfg)}

    def finish(self, result: RunResult) -> None:
        if self.ctx.is_main:
            write_eval_json(
                self.ctx.out,
                "linprobe",
                result.metrics,
                self.cfg,
                num_classes=self.num_classes,
                num_train=dataset_len(self.train_ds),
                num_test=dataset_len(self.val_ds),
                pool=self.cfg.pool,
                train_blocks=self.cfg.train_blocks,
                cached_features=self.cached,
                seconds=time.perf_counter() - self.t_start,
                world_size=self.dist.world_size,
            )


def linprobe(cfg: LinprobeConfig, resume: bool = False, progress: bool = True) -> RunResult:
    """Linear probe (or partial fine-tune) as described by ``cfg`` on the one loop; see :class:`LinearProbing`.
    A new run replaces an earlier one in the same output; ``resume`` continues it instead."""
    ctx = start_run(cfg, LinearProbing.kind, resume=resume, progress=progress, overwrite=True)
    return Loop(LinearProbing(ctx)).run()
