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

import logging
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from maelab.config import ModelConfig, batch_summary, from_dict, to_dict
from maelab.data import eval_transform, pretrain_transform
from maelab.data.loader import ResumableSampler, build_loader
from maelab.engine.distributed import wrap_ddp
from maelab.engine.loop import Loop, Protocol, RunContext, RunResult, start_run
from maelab.engine.runtime import seed_everything
from maelab.engine.step import TrainStep
from maelab.errors import CheckpointError, DataError
from maelab.eval.classifier import (
    Classifier,
    build_classifier,
    classifier_kwargs,
    frozen_to_eval,
    layer_decay_param_groups,
    set_trainable_blocks,
)
from maelab.eval.common import (
    dataset_len,
    load_encoder_model,
    plain_loader,
    resolve_stats,
    shard,
    train_and_test_sets,
    write_eval_json,
)
from maelab.eval.config import DEFAULT_SCRATCH_MODEL, FinetuneConfig
from maelab.eval.metrics import evaluate_classifier

log = logging.getLogger(__name__)


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


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's ``posterize`` with Pillow 12's result for 0 bits kept (a black image): Pillow 13 refuses 0 bits,
    which timm's RandAugment ``PosterizeIncreasing`` asks for at magnitude 10 (``rand-m9-mstd0.5`` reaches it) and
    AutoAugment's ``Posterize`` at low magnitudes (policy ``v0``)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def zero_bit_posterize(transform: Any) -> Any:
    """``transform`` (timm's) with every RandAugment / AutoAugment posterize op using :func:`_posterize`; the
    other ops and the draws are timm's."""
    from timm.data.auto_augment import AugmentOp

    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp) and t.name.startswith("Posterize"):
            t.aug_fn = _posterize
        stack.extend(getattr(t, "transforms", None) or getattr(t, "ops", None) or [])
        stack.extend(op for sub in getattr(t, "policy", None) or [] for op in sub)
    return transform


def finetune_train_transform(
    cfg: FinetuneConfig, img_size: int | tuple[int, int], in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Any], Any]:
    """The fine-tuning augmentation (timm ``create_transform``, as the official code).

    Images with 1 or 3 channels get the full recipe; other channel counts (possible with
    synthetic data) get RandomResizedCrop + flip + random erasing, since RandAugment works
    on PIL images.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    size = (h, w)
    if in_chans in (1, 3):
        from timm.data import create_transform

        tf = create_transform(
            size,
            is_training=True,
            scale=(cfg.data.min_scale, 1.0),
            hflip=0.5 if cfg.data.hflip else 0.0,
            color_jitter=cfg.color_jitter,  # type: ignore[arg-type]  # timm takes None: no color jitter
            auto_augment=cfg.auto_augment,
            interpolation="bicubic",
            mean=mean,
            std=std,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
        )
        return _SeedPythonRandom(zero_bit_posterize(tf), to_pil=True)
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import v2

    if cfg.auto_augment:
        log.warning(
            "auto_augment=%s needs 1- or 3-channel images; with in_chans=%d only RandomResizedCrop, flip "
            "and random erasing are used",
            cfg.auto_augment,
            in_chans,
        )
    ops: list[Any] = [pretrain_transform(size, mean, std, min_scale=cfg.data.min_scale, hflip=cfg.data.hflip)]
    if cfg.reprob > 0:
        ops.append(RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device="cpu"))
    return _SeedPythonRandom(v2.Compose(ops), to_pil=False)


# ---------------------------------------------------------------------------------- training
def seed_rank(seed: int, rank: int, epoch: int) -> None:
    """Seed python, numpy and torch for one rank's training draws in one epoch (drop path, Mixup/CutMix).

    Each rank gets its own stream, as the official ``main_finetune.py`` seeds ``seed + rank``; the
    epoch is mixed in (numpy's ``SeedSequence``) so that a run resumed at an epoch boundary draws
    what the uninterrupted run draws, with no per-rank RNG state in the checkpoint.
    """
    import numpy as np

    seed_everything(int(np.random.SeedSequence([seed + rank, epoch]).generate_state(1)[0]))


class Finetuning(Protocol):
    """Fine-tuning on the one loop: the classifier, its data, layer-decayed AdamW, Mixup/CutMix and the EMA; each
    evaluated epoch gives top-1 / top-5 (and the EMA's), and ``best.pt`` follows top-1."""

    kind = "finetune"
    best_metric = "top1"
    resume_keys = {"pool": "avg", "train_blocks": None}

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.dist, self.device, self.dtype = ctx.dist, ctx.device, ctx.dtype
        if ctx.state is not None and "encoder_config" not in ctx.state:
            raise CheckpointError(
                f"{ctx.state_path}: not a fine-tuning checkpoint; --resume continues a `maelab finetune` run"
            )
        mae = self._encoder_source()
        self._data()
        self._model(mae)
        del mae
        # DDP after the weights are final (it broadcasts rank 0's parameters once more)
        forward, no_sync = wrap_ddp(self.model, self.dist, self.device)
        self.step_fn = TrainStep(
            forward,
            self._loss,
            self.optimizer,
            self.device,
            self.dtype,
            parameters=self.trainable,
            grad_clip=self.cfg.grad_clip,
            no_sync=no_sync,
        )

    def _encoder_source(self) -> Any:
        """Sets ``model_cfg``, ``source`` and ``img_size`` from the resumed run, a scratch preset or the pre-trained
        checkpoint; returns the pre-trained model (None unless its weights are to be loaded)."""
        cfg, state = self.cfg, self.ctx.state
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
            mae = load_encoder_model(cfg.checkpoint, cfg.model, cfg.model_args, cfg.pool)
            self.model_cfg = mae.cfg
            self.source = str(cfg.checkpoint)
        saved_size = state["config"].get("img_size") if state is not None else None
        if isinstance(saved_size, list):
            saved_size = tuple(saved_size)
        self.img_size = next(s for s in (cfg.img_size, saved_size, self.model_cfg.img_size) if s is not None)
        return mae

    def _data(self) -> None:
        """The augmented training split with this rank's resumable sampler, and this rank's shard of the test split."""
        cfg, world = self.cfg, self.dist.world_size
        c = self.model_cfg.in_chans
        self.mean, self.std = resolve_stats(cfg.data, c)
        self.train_ds, self.val_ds, self.num_classes = train_and_test_sets(
            cfg.data,
            img_size=self.img_size,
            in_chans=c,
            train_transform=finetune_train_transform(cfg, self.img_size, c, self.mean, self.std),
            test_transform=eval_transform(self.img_size, self.mean, self.std, cfg.data.crop_pct),
            seed=cfg.seed,
            protocol="finetune",
        )
        if dataset_len(self.train_ds) < cfg.effective_batch(world):
            ranks = f" x world_size ({world} processes)" if self.dist.enabled else ""
            raise DataError(
                f"dataset {cfg.data.name!r} has {dataset_len(self.train_ds)} training images, fewer than "
                f"batch_size x accum_steps{ranks} = {cfg.effective_batch(world)}: lower --batch-size"
            )
        state = self.ctx.state
        if state is not None and state.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"{self.ctx.state_path}: the fine-tune being resumed has a {state.get('num_classes')}-class head, "
                f"but dataset {cfg.data.name!r} has {self.num_classes} classes; use the same dataset or another "
                "--output"
            )
        # an interleaved slice of each epoch's permutation per rank; a disjoint shard of the test split
        self.sampler = ResumableSampler(
            dataset_len(self.train_ds), seed=cfg.seed, shuffle=True, rank=self.dist.rank, world_size=world
        )
        pin = self.device.type == "cuda"
        self.loader = build_loader(self.train_ds, cfg.batch_size, self.sampler, cfg.data.num_workers, pin_memory=pin)
        self.val_loader = plain_loader(shard(self.val_ds, self.dist), cfg.batch_size, cfg.data.num_workers, self.device)
        self.batches_per_epoch = len(self.sampler) // cfg.batch_size

    def _model(self, mae: Any) -> None:
        """The classifier (pre-trained weights unless scratch or resumed), layer-decayed AdamW, Mixup/CutMix with
        its criterion, and the EMA."""
        cfg = self.cfg
        self.model: Classifier = build_classifier(
            mae,
            self.num_classes,
            model_cfg=self.model_cfg,
            pool=cfg.pool,
            drop_path=cfg.drop_path,
            img_size=self.img_size,
            source=self.source,
        )
        set_trainable_blocks(self.model, cfg.train_blocks)
        self.model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = layer_decay_param_groups(self.model, cfg.weight_decay, cfg.layer_decay)
        fused = self.device.type == "cuda"
        lr = cfg.resolved_lr(self.dist.world_size)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=fused or None)
        self.mixup = self._mixup()
        self.criterion = self._criterion()
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)  # on every rank (the weights agree)

    def summary(self) -> str:
        cfg = self.cfg
        world = self.dist.world_size
        params = sum(p.numel() for p in self.trainable)
        steps = self.batches_per_epoch // cfg.accum_steps * cfg.epochs
        return (
            f"fine-tuning {self.source} ({params / 1e6:.1f}M trainable params) on {cfg.data.name!r} "
            f"({dataset_len(self.train_ds)} images, {self.num_classes} classes); "
            f"{batch_summary(cfg.batch_size, cfg.accum_steps, world, cfg.resolved_lr(world))}, {cfg.epochs} epochs "
            f"({cfg.warmup_epochs:g} warmup) = {steps} steps, {self.device} "
            f"{str(self.dtype).removeprefix('torch.')}; output {self.ctx.out}"
        )

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

    # ------------------------------------------------------------------ loop hooks
    def _loss(self, forward: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy (soft targets under Mixup/CutMix, label smoothing) of one micro-batch."""
        imgs, target = batch
        imgs = imgs.to(self.device, non_blocking=True)
        target = torch.as_tensor(target).to(self.device, non_blocking=True)
        if self.mixup is not None:
            imgs, target = self.mixup(imgs, target)
        return self.criterion(forward(imgs).float(), target)

    def epoch_batches(self, epoch: int, start_batch: int) -> Any:
        self.sampler.set_epoch(epoch, start=start_batch * self.cfg.batch_size)
        return self.loader

    def start_epoch(self, epoch: int) -> None:
        seed_rank(self.cfg.seed, self.dist.rank, epoch)  # drop path and Mixup differ between ranks

    def train_mode(self) -> None:
        self.model.train()
        frozen_to_eval(self.model, self.cfg.train_blocks)

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:  # sharded under torchrun; the summed metrics are the same on every rank
            ev = evaluate_classifier(
                model, self.val_loader, self.device, self.dtype, info=self.dist, num_classes=self.num_classes
            )
        finally:
            model.train(was_training)
        ev.pop("num_images")
        return ev

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        if not (final or epoch % self.cfg.eval_every == 0):
            return {}
        record = self._evaluate(self.model)
        if self.ema is not None:
            record.update({f"ema_{k}": v for k, v in self._evaluate(self.ema.module).items()})
        return record

    def epoch_message(self, record: dict[str, Any]) -> str | None:
        if "top1" not in record:
            return None
        return (
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, val top-1 {record['top1']:.2f}"
            + (f", top-5 {record['top5']:.2f}" if "top5" in record else "")
            + (f", ema top-1 {record['ema_top1']:.2f}" if "ema_top1" in record else "")
            + f" (best {record['best_top1']:.2f})"
        )

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "num_classes": self.num_classes,
            "classifier": {
                "timm_name": self.model_cfg.timm_name,
                "timm_kwargs": classifier_kwargs(
                    self.model_cfg, self.num_classes, self.cfg.pool, self.cfg.drop_path, self.img_size
                ),
            },
            "encoder_config": to_dict(self.model_cfg),
            "source": self.source,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_model_state(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(
                f"{self.ctx.state_path}: weights do not match the classifier "
                f"({first[1].strip() if len(first) > 1 else first[0]})"
            ) from e

    def load_extra_state(self, state: dict[str, Any], start_batch: int) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    def finish(self, result: RunResult) -> None:
        if self.ctx.is_main:
            write_eval_json(
                self.ctx.out,
                "finetune",
                result.metrics,
                self.cfg,
                num_classes=self.num_classes,
                num_train=dataset_len(self.train_ds),
                num_test=dataset_len(self.val_ds),
                pool=self.cfg.pool,
                train_blocks=self.cfg.train_blocks,
                trainable_params=sum(p.numel() for p in self.trainable),
                world_size=self.dist.world_size,
            )


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune as described by ``cfg`` on the one loop; see :class:`Finetuning`. ``metrics`` of the result:
    the last evaluation, best_top1, best_epoch, epochs, steps (as in ``eval.json``)."""
    ctx = start_run(cfg, Finetuning.kind, resume=resume, progress=progress)
    return Loop(Finetuning(ctx)).run()
