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

from maelab.config import save_yaml, to_dict
from maelab.data import pretrain_transform
from maelab.data.loader import ResumableSampler, build_loader
from maelab.engine.checkpoint import LAST, atomic_save
from maelab.engine.metrics import MetricsLog
from maelab.engine.optim import set_lr
from maelab.engine.runtime import (
    autocast,
    resolve_device,
    resolve_precision,
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
    train_and_test_sets,
    write_eval_json,
)
from maelab.eval.config import LinprobeConfig
from maelab.eval.features import encode, extract_features
from maelab.eval.knn import topk_accuracy

log = logging.getLogger(__name__)

BEST = "best.pt"


class LinearProbe(nn.Module):
    """Encoder (frozen but for its last ``train_blocks`` blocks) + pooling + BN + Linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "cls", train_blocks: int = 0,
                 head_init_std: float = 0.01) -> None:
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
        return self.head(self.features(imgs).float())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The head and any tuned encoder parameters (all that differs from the checkpoint)."""
        tuned = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k.startswith("head.") or k in tuned}


def probe_param_groups(model: nn.Module, weight_decay: float, lars: bool = False) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices (weight decay; LARS adaptation) and 1-D
    parameters such as biases and norms (no weight decay, no LARS adaptation), as the official LARS."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if lars:
        groups[0]["always_adapt"] = True
        groups[1]["always_adapt"] = False
    return [g for g in groups if g["params"]]


def build_probe_optimizer(model: nn.Module, cfg: LinprobeConfig, lr: float) -> torch.optim.Optimizer:
    """LARS (timm, trust coefficient 1e-3, momentum), SGD (momentum) or AdamW over the trainable parameters."""
    if cfg.optimizer == "lars":
        from timm.optim import Lars

        return Lars(probe_param_groups(model, cfg.weight_decay, lars=True), lr=lr, momentum=cfg.momentum,
                    trust_coeff=0.001)
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
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        mae = load_encoder_model(cfg.checkpoint, cfg.model, cfg.model_args)  # type: ignore[arg-type]
        self.model_cfg = mcfg = mae.cfg
        self.mean, self.std = resolve_stats(cfg.data, mcfg.in_chans)
        test_tf = evaluation_transform(mcfg.img_size, self.mean, self.std, cfg.data.crop_pct)
        train_tf = (pretrain_transform(mcfg.img_size, self.mean, self.std, min_scale=cfg.crop_min_scale,
                                       hflip=cfg.data.hflip) if cfg.augment else test_tf)
        self.train_ds, self.val_ds, self.num_classes = train_and_test_sets(
            cfg.data, img_size=mcfg.img_size, in_chans=mcfg.in_chans, train_transform=train_tf,
            test_transform=test_tf, seed=cfg.seed, protocol="linprobe")
        if len(self.train_ds) < cfg.batch_size:
            raise DataError(f"dataset {cfg.data.name!r} has {len(self.train_ds)} training images, fewer than "
                            f"batch_size={cfg.batch_size}: lower --batch-size")
        seed_everything(cfg.seed)  # the head's init depends on the seed only
        self.model = LinearProbe(mae.encoder, self.num_classes, cfg.pool, cfg.train_blocks).to(self.device)
        self.cached = cfg.uses_cache
        self.peak_lr = cfg.resolved_lr()
        self.optimizer = build_probe_optimizer(self.model, cfg, self.peak_lr)
        self.sampler = ResumableSampler(len(self.train_ds), seed=cfg.seed, shuffle=True)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss()
        self.step = 0
        self.epoch = 0
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        reset_metrics(self.metrics.path)
        save_yaml(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------ data
    def _extract(self, ds: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = plain_loader(ds, self.cfg.batch_size, self.cfg.data.num_workers, self.device)
        return extract_features(self.model.encoder, loader, self.cfg.pool, self.device, self.dtype,
                                progress=self.progress, desc=desc)

    def _cached_batches(self, feats: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The streaming loader's batches, read from the cache: same order, last partial batch dropped."""
        order = torch.tensor(self.sampler.order(), dtype=torch.long, device=feats.device)
        bs = self.cfg.batch_size
        for i in range(self.steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            yield feats[idx], labels[idx]

    def _streamed_batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images -> (features, labels); the encoder runs without grad unless blocks are tuned."""
        tuned = self.cfg.train_blocks > 0
        for imgs, labels in loader:
            imgs = imgs.to(self.device, non_blocking=True)
            with torch.set_grad_enabled(tuned), autocast(self.device, self.dtype):
                feats = self.model.features(imgs)
            yield feats.float(), torch.as_tensor(labels).to(self.device)

    # ------------------------------------------------------------------ training
    def lr(self) -> float:
        return lr_at(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     peak_lr=self.peak_lr, min_lr=self.cfg.min_lr)

    def train_step(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        set_lr(self.optimizer, self.lr())
        logits = self.model.head(feats)  # fp32 head in both paths
        loss = self.criterion(logits, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, val_cache: tuple[torch.Tensor, torch.Tensor] | None, val_loader: Any) -> dict[str, float]:
        """Top-1 / top-5 (percent) and loss on the test split, from cached features when the encoder is frozen."""
        self.model.eval()
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        if val_cache is not None:
            feats, labels = val_cache
            for i in range(0, feats.shape[0], 4096):
                chunks.append((self.model.head(feats[i:i + 4096]), labels[i:i + 4096]))
        else:
            for imgs, labels in val_loader:
                imgs = imgs.to(self.device, non_blocking=True)
                with autocast(self.device, self.dtype):
                    feats = self.model.features(imgs)
                chunks.append((self.model.head(feats.float()), torch.as_tensor(labels).to(self.device)))
        self.model.train()
        logits = torch.cat([c[0] for c in chunks]).float()
        labels = torch.cat([c[1] for c in chunks])
        out = topk_accuracy(logits, labels)
        out["val_loss"] = nn.functional.cross_entropy(logits, labels).item()
        return out

    def run(self) -> LinprobeResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        frozen = cfg.train_blocks == 0
        train_cache = self._extract(self.train_ds, "train features") if self.cached else None
        val_cache = self._extract(self.val_ds, "test features") if frozen else None
        val_loader = None if frozen else plain_loader(self.val_ds, cfg.batch_size, cfg.data.num_workers, self.device)
        loader = None if self.cached else build_loader(self.train_ds, cfg.batch_size, self.sampler,
                                                       cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        best: dict[str, Any] = {"top1": -1.0, "epoch": 0}
        last: dict[str, Any] = {}
        check_every = 1 if self.device.type == "cpu" else cfg.log_every
        bar = tqdm(total=self.total_steps, disable=not self.progress, unit="step", dynamic_ncols=True, smoothing=0.1)
        self.model.train()
        while self.epoch < cfg.epochs:
            bar.set_description(f"linprobe {self.epoch + 1}/{cfg.epochs}{' (cached)' if self.cached else ''}")
            self.sampler.set_epoch(self.epoch)
            batches = (self._cached_batches(*train_cache) if train_cache is not None
                       else self._streamed_batches(loader))
            t_epoch, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
            window, window_steps, t_window = torch.zeros((), device=self.device), 0, time.perf_counter()
            for done, (feats, labels) in enumerate(batches, start=1):
                loss = self.train_step(feats, labels)
                seen += feats.shape[0]
                window += loss
                window_steps += 1
                if self.step % check_every == 0 or self.step % cfg.log_every == 0 or done == self.steps_per_epoch:
                    value = window.item() / window_steps
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"non-finite probe loss ({value}) at step {self.step}; "
                                                 "try a lower lr")
                    loss_sum += value * window_steps
                    loss_n += window_steps
                    rate = window_steps * cfg.batch_size / max(time.perf_counter() - t_window, 1e-9)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.lr():.2e}", img_s=f"{rate:.0f}")
                    window, window_steps, t_window = torch.zeros((), device=self.device), 0, time.perf_counter()
                bar.update(1)
                if done >= self.steps_per_epoch:
                    break
            elapsed = time.perf_counter() - t_epoch
            self.epoch += 1
            record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "loss": loss_sum / max(loss_n, 1),
                                      "lr": self.lr(), "img_per_s": seen / max(elapsed, 1e-9),
                                      "epoch_time_s": elapsed}
            final = self.epoch == cfg.epochs
            if final or self.epoch % cfg.eval_every == 0:
                last = self.evaluate(val_cache, val_loader)
                record.update(last)
                if last["top1"] > best["top1"]:
                    best = {"top1": last["top1"], "epoch": self.epoch}
                    atomic_save(self._state(), self.ckpt_dir / BEST)
                record["best_top1"] = best["top1"]
            record["time"] = time.time()
            self.metrics.append(record)
            atomic_save(self._state(), self.ckpt_dir / LAST)
        bar.close()
        metrics = {**last, "best_top1": best["top1"], "best_epoch": best["epoch"], "epochs": self.epoch,
                   "steps": self.step}
        write_eval_json(self.out, "linprobe", metrics, cfg, num_classes=self.num_classes,
                        num_train=len(self.train_ds), num_test=len(self.val_ds), pool=cfg.pool,
                        train_blocks=cfg.train_blocks, cached_features=self.cached,
                        seconds=time.perf_counter() - t_start)
        return LinprobeResult(self.out, metrics, self.cached)

    def _state(self) -> dict[str, Any]:
        return {"kind": "linprobe", "probe": self.model.trainable_state_dict(), "num_classes": self.num_classes,
                "encoder_config": to_dict(self.model_cfg), "config": to_dict(self.cfg), "epoch": self.epoch,
                "step": self.step}


def linprobe(cfg: LinprobeConfig, progress: bool = True) -> LinprobeResult:
    """Linear probe (or partial fine-tune) as described by ``cfg``; see :class:`LinearProber`."""
    return LinearProber(cfg, progress=progress).run()
