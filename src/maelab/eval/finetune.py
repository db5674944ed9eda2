"""End-to-end (or partial) fine-tuning of a pre-trained encoder: the paper's recipe on timm parts.

``finetune(cfg)`` builds a timm ViT classifier from the checkpoint (or a random init with
``from_scratch``), and trains it with timm's building blocks, as the official code does:

- ``timm.data.create_transform``: RandomResizedCrop (bicubic) + flip + RandAugment
  (``rand-m9-mstd0.5-inc1``) + random erasing; evaluation uses resize + center crop only;
- ``timm.data.Mixup`` (mixup 0.8 / cutmix 1.0, label smoothing folded into soft targets)
  with ``SoftTargetCrossEntropy``, else ``LabelSmoothingCrossEntropy``;
- ``timm.optim.param_groups_layer_decay`` (layer-wise lr decay) + AdamW(0.9, 0.999);
- optional ``timm.utils.ModelEmaV3``; stochastic depth through ``drop_path_rate``;

with per-iteration warmup + cosine lr (``lr = base_lr * batch / 256``). Each epoch is
evaluated (top-1 / top-5); ``checkpoints/last.pt`` and ``checkpoints/best.pt`` are written
atomically, ``metrics.jsonl`` gets one record per epoch and ``eval.json`` the final result.
``--resume`` continues from ``last.pt`` at the next epoch.

Under ``torchrun`` the classifier is wrapped in ``DistributedDataParallel``; each rank reads
its interleaved slice of the epoch's permutation (``ResumableSampler``), so N processes with
batch ``b`` see the global batches of one process with batch ``N x b``, and the lr follows
the global batch (``batch_size x accum_steps x world_size``). Every rank builds the model from
the same seed; the training draws (drop path, Mixup/CutMix) then come from a stream of its own,
as the official ``seed + rank`` (:func:`seed_rank`), so the ranks' slices of a global batch get
different drop-path masks and mixing, as under the official code.
Evaluation is sharded (disjoint slices, no padding) and the correct counts are summed over
ranks; the EMA is updated on every rank. Only rank 0 writes checkpoints, metrics and
``eval.json`` and shows progress; on ``--resume`` every rank loads ``last.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from maelab.config import ModelConfig, batch_summary, from_dict, save_yaml, to_dict
from maelab.data import pretrain_transform
from maelab.data.loader import ResumableSampler, build_loader
from maelab.engine.checkpoint import LAST, atomic_save, load_resume_state
from maelab.engine.distributed import DistInfo, all_reduce_mean, barrier, setup_process
from maelab.engine.metrics import MetricsLog
from maelab.engine.optim import set_lr
from maelab.engine.runtime import (
    autocast,
    explain_out_of_memory,
    seed_everything,
)
from maelab.engine.schedule import lr_at
from maelab.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from maelab.eval.classifier import (
    build_classifier,
    classifier_kwargs,
    frozen_to_eval,
    layer_decay_param_groups,
    set_trainable_blocks,
)
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
from maelab.eval.config import DEFAULT_SCRATCH_MODEL, FinetuneConfig
from maelab.eval.knn import summed_topk, topk_correct

log = logging.getLogger(__name__)

BEST = "best.pt"


# ---------------------------------------------------------------------------------- transforms
class _SeedPythonRandom:
    """Seed python's ``random`` (used by timm's crops, RandAugment, erasing) and numpy's global RNG
    (RandAugment picks its ops with ``np.random.choice``) from torch's RNG, which ``SeededDataset``
    seeds per sample: augmentation then depends only on (seed, epoch, index), not on which samples
    a process loaded before (the number of workers or of torchrun ranks). numpy's state is
    restored afterwards, so the training loop's own numpy draws (Mixup) do not depend on the data.
    uint8 tensors [C, H, W] (the synthetic data) become PIL images first."""

    def __init__(self, transform: Callable[[Any], Any], to_pil: bool) -> None:
        self.transform = transform
        self.to_pil = to_pil

    def __call__(self, img: Any) -> torch.Tensor:
        import numpy as np

        seed = int(torch.randint(0, 2**62, ()).item())
        random.seed(seed)
        if self.to_pil and isinstance(img, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            img = to_pil_image(img)
        np_state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return self.transform(img)
        finally:
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def finetune_train_transform(
    cfg: FinetuneConfig, img_size: int | tuple[int, int], in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Any], Any]:
    """The fine-tuning augmentation (timm ``create_transform``, as the official code).

    Images with 1 or 3 channels get the full recipe; other channel counts (possible with
    synthetic data) get RandomResizedCrop + flip + random erasing, since RandAugment works
    on PIL images.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if in_chans in (1, 3):
        from timm.data import create_transform

        tf = create_transform(
            size,
            is_training=True,
            scale=(cfg.crop_min_scale, 1.0),
            hflip=0.5 if cfg.data.hflip else 0.0,
            color_jitter=cfg.color_jitter,
            auto_augment=cfg.auto_augment,
            interpolation="bicubic",
            mean=mean,
            std=std,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
        )
        return _SeedPythonRandom(tf, to_pil=True)
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import v2

    if cfg.auto_augment:
        log.warning(
            "auto_augment=%s needs 1- or 3-channel images; with in_chans=%d only RandomResizedCrop, flip "
            "and random erasing are used",
            cfg.auto_augment,
            in_chans,
        )
    ops: list[Any] = [pretrain_transform(size, mean, std, min_scale=cfg.crop_min_scale, hflip=cfg.data.hflip)]
    if cfg.reprob > 0:
        ops.append(RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device="cpu"))
    return _SeedPythonRandom(v2.Compose(ops), to_pil=False)


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    info: DistInfo | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 (percent; top-5 only with more than 5 classes) and mean cross-entropy.

    The model runs in eval mode (its mode is restored); the loader must carry the
    deterministic evaluation transform. Under torchrun (``info.enabled``) the loader holds
    this rank's shard (:func:`maelab.eval.common.shard`: disjoint, not padded) and the
    correct counts, loss sums and image counts are added over ranks, so every rank returns
    the metrics of the whole split. ``num_classes`` defaults to the logits' width.
    """
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    correct: dict[str, torch.Tensor] = {}
    loss_sum, n = 0.0, 0
    try:
        for imgs, target in tqdm(
            loader, disable=not (progress and info.is_main), desc="eval", leave=False, dynamic_ncols=True
        ):
            imgs = imgs.to(device, non_blocking=True)
            target = torch.as_tensor(target).to(device)
            with autocast(device, dtype):
                logits = model(imgs)
            logits = logits.float()
            num_classes = num_classes or logits.shape[1]
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            for key, count in topk_correct(logits, target, num_classes=num_classes).items():
                correct[key] = correct[key] + count if key in correct else count
            n += imgs.shape[0]
    finally:
        model.train(was_training)
    if not correct:  # an empty split (or an empty shard, which still joins the sums)
        if info.enabled and num_classes is None:
            raise ValueError("evaluate() under torchrun needs num_classes when a rank holds no images")
        correct = {
            f"top{k}": torch.zeros((), dtype=torch.long, device=device)
            for k in (1, 5)
            if k == 1 or k < (num_classes or 0)
        }
    out, total = summed_topk(correct, n, info, extra={"loss": loss_sum})
    if total == 0:
        raise DataError("the evaluation split is empty")
    loss = out.pop("loss")
    return {**out, "loss": loss / total, "num_images": total}


def _eval_record(ev: dict[str, float]) -> dict[str, float]:
    """evaluate() output as metrics.jsonl keys: top1, top5, val_loss."""
    return {("val_loss" if k == "loss" else k): v for k, v in ev.items() if k != "num_images"}


# ---------------------------------------------------------------------------------- training
def seed_rank(seed: int, rank: int, epoch: int) -> None:
    """Seed python, numpy and torch for one rank's training draws in one epoch (drop path, Mixup/CutMix).

    Each rank gets its own stream, as the official ``main_finetune.py`` seeds ``seed + rank``; the
    epoch is mixed in (numpy's ``SeedSequence``) so that a run resumed at an epoch boundary draws
    what the uninterrupted run draws, with no per-rank RNG state in the checkpoint.
    """
    import numpy as np

    seed_everything(int(np.random.SeedSequence([seed + rank, epoch]).generate_state(1)[0]))


@dataclass
class FinetuneResult:
    output: Path
    metrics: dict[str, Any]
    epoch: int
    step: int


class Finetuner:
    """State of one fine-tuning run; ``run()`` trains to ``cfg.epochs`` and writes eval.json."""

    def __init__(self, cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.dist, self.device, self.dtype = setup_process(cfg.device, cfg.precision)
        self.is_main = self.dist.is_main
        self.world_size = self.dist.world_size
        seed_everything(cfg.seed)  # the same on every rank: identical initialization (the head, the EMA copy)
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        state = self._resume_state() if resume else None  # every rank reads the checkpoint
        if state is None and (self.ckpt_dir / LAST).exists():
            raise ConfigError(
                f"{self.out} already holds a fine-tuning run (checkpoints/last.pt): pass --resume to "
                "continue it or choose another --output"
            )

        # encoder / architecture
        mae = None
        if state is not None:
            self.model_cfg = from_dict(ModelConfig, state["encoder_config"])
            self.source = state.get("source", "resumed")
        elif cfg.from_scratch:
            from maelab.models.registry import get_config

            if cfg.checkpoint:
                log.warning("from_scratch=true: not loading checkpoint=%s (random initialization)", cfg.checkpoint)
            self.model_cfg = get_config(cfg.model or DEFAULT_SCRATCH_MODEL, **cfg.model_args)
            self.source = "scratch"
        else:
            mae = load_encoder_model(cfg.checkpoint, cfg.model, cfg.model_args)  # type: ignore[arg-type]
            self.model_cfg = mae.cfg
            self.source = str(cfg.checkpoint)
        saved_size = state["config"].get("img_size") if state is not None else None
        if isinstance(saved_size, list):
            saved_size = tuple(saved_size)
        self.img_size = next(s for s in (cfg.img_size, saved_size, self.model_cfg.img_size) if s is not None)

        # data
        c = self.model_cfg.in_chans
        self.mean, self.std = resolve_stats(cfg.data, c)
        self.train_ds, self.val_ds, self.num_classes = train_and_test_sets(
            cfg.data,
            img_size=self.img_size,
            in_chans=c,
            train_transform=finetune_train_transform(cfg, self.img_size, c, self.mean, self.std),
            test_transform=evaluation_transform(self.img_size, self.mean, self.std, cfg.data.crop_pct),
            seed=cfg.seed,
            protocol="finetune",
        )
        if len(self.train_ds) < cfg.effective_batch(self.world_size):
            ranks = f" x world_size ({self.world_size} processes)" if self.dist.enabled else ""
            raise DataError(
                f"dataset {cfg.data.name!r} has {len(self.train_ds)} training images, fewer than "
                f"batch_size x accum_steps{ranks} = {cfg.effective_batch(self.world_size)}: "
                "lower --batch-size"
            )
        if state is not None:
            saved = state.get("num_classes")
            if saved != self.num_classes:
                raise CheckpointError(
                    f"{self._resume_path}: the fine-tune being resumed has a {saved}-class head, "
                    f"but dataset {cfg.data.name!r} has {self.num_classes} classes; use the same "
                    "dataset or another --output"
                )

        # model
        self.model = build_classifier(
            mae,
            self.num_classes,
            model_cfg=self.model_cfg,
            pool=cfg.pool,
            drop_path=cfg.drop_path,
            img_size=self.img_size,
            source=self.source,
        )
        del mae
        set_trainable_blocks(self.model, cfg.train_blocks)
        self.model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = layer_decay_param_groups(self.model, cfg.weight_decay, cfg.layer_decay)
        self.peak_lr = cfg.resolved_lr(self.world_size)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=cfg.betas, fused=fused or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.mixup = self._mixup()
        self.criterion = self._criterion()
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)  # on every rank (the weights agree)

        # loaders: an interleaved slice of each epoch's permutation per rank; a disjoint shard of the test split
        self.sampler = ResumableSampler(
            len(self.train_ds), seed=cfg.seed, shuffle=True, rank=self.dist.rank, world_size=self.world_size
        )
        pin = self.device.type == "cuda"
        self.loader = build_loader(self.train_ds, cfg.batch_size, self.sampler, cfg.data.num_workers, pin_memory=pin)
        self.val_loader = plain_loader(shard(self.val_ds, self.dist), cfg.batch_size, cfg.data.num_workers, self.device)
        self.batches_per_epoch = len(self.sampler) // cfg.batch_size
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_steps
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)

        self.step = 0
        self.epoch = 0
        self.best: dict[str, Any] = {"top1": -1.0, "epoch": 0}
        self.last_eval: dict[str, Any] = {}
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        if state is not None:
            self._load_state(state)
        barrier(self.dist)  # every rank has read the checkpoint before rank 0 writes anything
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            reset_metrics(self.metrics.path, self.epoch)
            save_yaml(cfg, self.out / "config.yaml")

        # DDP after the weights are final (it broadcasts rank 0's parameters once more)
        self.forward: nn.Module = self.model
        self.ddp: nn.Module | None = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        if self.is_main:
            log.info(self.summary())

    def summary(self) -> str:
        """One line: what is fine-tuned on what, with which batch, lr and length."""
        cfg = self.cfg
        params = sum(p.numel() for p in self.trainable)
        return (
            f"fine-tuning {self.source} ({params / 1e6:.1f}M trainable params) on {cfg.data.name!r} "
            f"({len(self.train_ds)} images, {self.num_classes} classes); "
            f"{batch_summary(cfg.batch_size, cfg.accum_steps, self.world_size, self.peak_lr)}, {cfg.epochs} epochs "
            f"({cfg.warmup_epochs:g} warmup) = {self.total_steps} steps, {self.device} "
            f"{str(self.dtype).removeprefix('torch.')}; output {self.out}"
        )

    # ------------------------------------------------------------------ setup helpers
    def _mixup(self) -> Any:
        cfg = self.cfg
        if not cfg.uses_mixup:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=self.num_classes,
        )

    def _criterion(self) -> nn.Module:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if self.cfg.smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=self.cfg.smoothing)
        return nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ checkpoints
    def _resume_state(self) -> dict[str, Any]:
        state, path = load_resume_state(self.ckpt_dir)
        self._resume_path = path
        if state.get("kind") != "finetune" or "encoder_config" not in state:
            raise CheckpointError(f"{path}: not a fine-tuning checkpoint; --resume continues a `maelab finetune` run")
        saved = state.get("config", {})
        saved_world = state.get("world_size", 1)
        keys = ("batch_size", "accum_steps") if saved_world == self.world_size else ()
        for key in (*keys, "seed", "pool", "train_blocks"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise CheckpointError(
                    f"{path}: resuming with {key}={getattr(self.cfg, key)!r} but the run used "
                    f"{saved[key]!r}; keep it the same to resume"
                )
        saved_batch = (
            saved.get("batch_size", self.cfg.batch_size) * saved.get("accum_steps", self.cfg.accum_steps) * saved_world
        )
        now_batch = self.cfg.effective_batch(self.world_size)
        if saved_batch != now_batch:
            raise CheckpointError(
                f"{path}: the run used a global batch of {saved_batch} images per step, now it "
                f"would be {now_batch} (batch_size x accum_steps x world_size): keep it the same "
                "to resume"
            )
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(
                f"{self._resume_path}: weights do not match the classifier "
                f"({first[1].strip() if len(first) > 1 else first[0]})"
            ) from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.best = state.get("best", self.best)
        self.last_eval = state.get("last_eval", {})
        log.info("resumed %s at epoch %d, step %d", self._resume_path, self.epoch, self.step)

    def state_dict(self, full: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kind": "finetune",
            "model": self.model.state_dict(),
            "num_classes": self.num_classes,
            "classifier": {
                "timm_name": self.model_cfg.timm_name,
                "timm_kwargs": classifier_kwargs(
                    self.model_cfg, self.num_classes, self.cfg.pool, self.cfg.drop_path, self.img_size
                ),
            },
            "encoder_config": to_dict(self.model_cfg),
            "config": to_dict(self.cfg),
            "source": self.source,
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "best": self.best,
            "last_eval": self.last_eval,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict())
        return state

    # ------------------------------------------------------------------ training
    def lr(self) -> float:
        return lr_at(
            self.step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.peak_lr,
            min_lr=self.cfg.min_lr,
        )

    def train_mode(self) -> None:
        self.model.train()
        frozen_to_eval(self.model, self.cfg.train_blocks)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over ``accum_steps`` micro-batches; returns the mean loss (on device)."""
        set_lr(self.optimizer, self.lr())
        total = torch.zeros((), device=self.device)
        for i, (imgs, target) in enumerate(batches):
            imgs = imgs.to(self.device, non_blocking=True)
            target = torch.as_tensor(target).to(self.device, non_blocking=True)
            if self.mixup is not None:
                imgs, target = self.mixup(imgs, target)
            # DDP: all-reduce (average) the gradients once, on the last micro-batch
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()  # type: ignore[operator]
            with sync:
                with autocast(self.device, self.dtype):
                    logits = self.forward(imgs)
                loss = self.criterion(logits.float(), target)
                self.scaler.scale(loss / len(batches)).backward()
            total += loss.detach()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return total / len(batches)

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite fine-tuning loss ({value}) at epoch {self.epoch + 1}, step "
                f"{self.step}; try a lower lr, grad_clip=1.0 or precision=fp32"
            )

    def run(self) -> FinetuneResult:
        cfg = self.cfg
        check_every = 1 if self.device.type == "cpu" else cfg.log_every
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
        )
        while self.epoch < cfg.epochs:
            bar.set_description(f"finetune {self.epoch + 1}/{cfg.epochs}")
            self.sampler.set_epoch(self.epoch)
            seed_rank(cfg.seed, self.dist.rank, self.epoch)  # drop path and Mixup differ between ranks
            self.train_mode()
            t_epoch, seen = time.perf_counter(), 0
            loss_sum, loss_steps = 0.0, 0
            window, window_steps, t_window = torch.zeros((), device=self.device), 0, time.perf_counter()
            pending: list[tuple[torch.Tensor, torch.Tensor]] = []
            steps_done = 0
            for batch in self.loader:
                pending.append(batch)
                if len(pending) < cfg.accum_steps:
                    continue
                with explain_out_of_memory(cfg, self.device):
                    loss = self.train_step(pending)
                seen += sum(b[0].shape[0] for b in pending) * self.world_size
                pending = []
                steps_done += 1
                window += loss
                window_steps += 1
                if self.step % check_every == 0 or self.step % cfg.log_every == 0 or steps_done == self.steps_per_epoch:
                    value = all_reduce_mean(window, self.dist).item() / window_steps  # the same on every rank
                    self._check_finite(value)
                    loss_sum += value * window_steps
                    loss_steps += window_steps
                    rate = (
                        window_steps * cfg.effective_batch(self.world_size) / max(time.perf_counter() - t_window, 1e-9)
                    )
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.lr():.2e}", img_s=f"{rate:.0f}")
                    window, window_steps, t_window = torch.zeros((), device=self.device), 0, time.perf_counter()
                bar.update(1)
                if steps_done >= self.steps_per_epoch:
                    break
            elapsed = time.perf_counter() - t_epoch
            self.epoch += 1
            record: dict[str, Any] = {
                "epoch": self.epoch,
                "step": self.step,
                "loss": loss_sum / max(loss_steps, 1),
                "lr": self.lr(),
                "img_per_s": seen / max(elapsed, 1e-9),
                "epoch_time_s": elapsed,
            }
            final = self.epoch == cfg.epochs
            if final or self.epoch % cfg.eval_every == 0:
                # sharded under torchrun; the summed metrics are the same on every rank
                ev = evaluate(
                    self.model, self.val_loader, self.device, self.dtype, info=self.dist, num_classes=self.num_classes
                )
                record.update(_eval_record(ev))
                if self.ema is not None:
                    ev_ema = evaluate(
                        self.ema.module,
                        self.val_loader,
                        self.device,
                        self.dtype,
                        info=self.dist,
                        num_classes=self.num_classes,
                    )
                    record.update({f"ema_{k}": v for k, v in _eval_record(ev_ema).items()})
                self.last_eval = {k: v for k, v in record.items() if k.startswith(("top", "ema_", "val_"))}
                improved = ev["top1"] > self.best["top1"]
                if improved:
                    self.best = {
                        "top1": ev["top1"],
                        "epoch": self.epoch,
                        **({"top5": ev["top5"]} if "top5" in ev else {}),
                    }
                record["best_top1"] = self.best["top1"]
                if self.is_main:
                    bar.write(
                        f"epoch {self.epoch}: loss {record['loss']:.4f}, val top-1 {ev['top1']:.2f}"
                        + (f", top-5 {ev['top5']:.2f}" if "top5" in ev else "")
                        + (f", ema top-1 {record['ema_top1']:.2f}" if "ema_top1" in record else "")
                        + f" (best {self.best['top1']:.2f} @ {self.best['epoch']})"
                    )
                if improved and self.is_main:
                    atomic_save(self.state_dict(full=False), self.ckpt_dir / BEST)
            record["time"] = time.time()
            if self.is_main:  # the weights, optimizer and EMA are identical on every rank
                self.metrics.append(record)
                atomic_save(self.state_dict(), self.ckpt_dir / LAST)
        bar.close()
        metrics = {
            **self.last_eval,
            "best_top1": self.best["top1"],
            "best_epoch": self.best["epoch"],
            "epochs": self.epoch,
            "steps": self.step,
        }
        if self.is_main:
            write_eval_json(
                self.out,
                "finetune",
                metrics,
                self.cfg,
                num_classes=self.num_classes,
                num_train=len(self.train_ds),
                num_test=len(self.val_ds),
                pool=self.cfg.pool,
                train_blocks=self.cfg.train_blocks,
                trainable_params=sum(p.numel() for p in self.trainable),
                world_size=self.world_size,
            )
        barrier(self.dist)  # the outputs exist when any rank returns
        return FinetuneResult(self.out, metrics, self.epoch, self.step)


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune as described by ``cfg``; see :class:`Finetuner`."""
    return Finetuner(cfg, resume=resume, progress=progress).run()
