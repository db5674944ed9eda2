"""Pre-training: the protocol of a masked-image-modeling method on the one training loop.

``pretrain(cfg)`` builds the method's model (:mod:`maelab.methods`), the data
(:func:`maelab.data.pipeline.build_training_data`) and AdamW from a :class:`PretrainConfig`, and runs
:class:`~maelab.engine.loop.Loop`: per-iteration warmup + cosine lr, the run directory (``config.yaml``,
``metrics.jsonl`` per epoch, ``steps.jsonl`` per log interval, ``checkpoints/``, ``figures/``), and an exact
resume: data order, augmentation and masking noise are functions of (seed, epoch, index/step), and their
states are saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch

from maelab.config import ModelConfig, PretrainConfig, batch_summary, to_dict
from maelab.data.build import EVAL_SPLIT_DIRS
from maelab.data.shards import ShardStream
from maelab.engine.accel import compile_or_eager, convert_to_fp8, uses_cudagraphs
from maelab.engine.checkpoint import config_mismatch
from maelab.engine.distributed import all_reduce_min, shard_model, wrap_ddp
from maelab.engine.loop import Loop, Protocol, RunContext, RunResult, start_run
from maelab.engine.optim import build_adamw
from maelab.engine.runtime import autocast
from maelab.errors import CheckpointError, ConfigError
from maelab.eval.common import dataset_len, resolve_stats
from maelab.methods import figure_note, get_method, method_model_config, method_options, pretrain_step
from maelab.models.mae import MaskedAutoencoder
from maelab.models.weights import init_from_mae, init_from_timm

log = logging.getLogger(__name__)

NUM_VIS_SAMPLES = 8


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP.no_sync: skip the gradient reduce-scatter for a micro-batch."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


class Pretraining(Protocol):
    """Pre-training of ``cfg.method`` (MAE by default) on the loop: model, data, optimizer, step, figures and the
    online kNN check."""

    kind = "pretrain"
    resume_keys = {"weight_decay_tokens": False, "method": "mae", "method_args": {}}  # older runs: tokens exempted

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = cfg = ctx.cfg
        self.dist, self.device, self.dtype = ctx.dist, ctx.device, ctx.dtype
        self.method = get_method(cfg.method)
        self.options = method_options(self.method, cfg.method_args)
        self.model_cfg: ModelConfig = method_model_config(self.method, cfg.model, cfg.model_args)
        self.mean, self.std = resolve_stats(cfg.data, self.model_cfg.in_chans)
        no_sync = self._setup_model(init=ctx.state is None)
        self.data = ctx.training_data(self.model_cfg.img_size, self.model_cfg.in_chans, self.mean, self.std)
        if self.data.gpu_resident or cfg.data.decode == "gpu":
            log.info("data: %r", self.data.loader)
        self.batches_per_epoch = self.data.batches_per_epoch
        self.optimizer = build_adamw(
            self.model,
            cfg.resolved_lr(self.dist.world_size),
            cfg.weight_decay,
            cfg.betas,
            decay_tokens=cfg.weight_decay_tokens,
        )
        gen_device = "cpu" if getattr(self.model, "noise_on_cpu", False) else self.device
        self.mask_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed)
        self.step_fn = pretrain_step(
            self.model,
            self.optimizer,
            self.device,
            self.dtype,
            generator=self.mask_gen,
            forward=self.forward,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            scaler=torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16),
            grad_clip=cfg.grad_clip,
            no_sync=no_sync,
            skip_nonfinite=cfg.max_bad_steps > 0,
            all_reduce_min=lambda t: all_reduce_min(t, self.dist),
            cudagraphs=uses_cudagraphs(self.compiled, cfg.compile_mode),
            eager_fallback=self.eager_fallback,
        )
        self.vis_batch = self._vis_batch() if ctx.is_main or self.fsdp else None
        self.knn_sets = self._knn_sets() if cfg.knn_every and ctx.is_main else None
        if self.compiled and ctx.is_main:
            log.info(
                "torch.compile: the first steps compile the model (a minute or more for large models; "
                "compile=off skips it)"
            )

    def summary(self) -> str:
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        cfg = self.cfg
        world = self.dist.world_size
        steps = self.batches_per_epoch // cfg.accum_steps * cfg.epochs
        compiled = f", torch.compile ({cfg.compile_mode})" if self.compiled else ", eager"
        fp8 = f", fp8 {cfg.fp8} in {self.fp8_layers} Linear layers" if self.fp8_layers else ""
        return (
            f"pre-training {cfg.model} with {self.method.name} ({params / 1e6:.1f}M trainable params) on "
            f"{cfg.data.name!r} ({len(self.data.dataset)} images, {self.data.description}); "
            f"{batch_summary(cfg.batch_size, cfg.accum_steps, world, cfg.resolved_lr(world))}, "
            f"{cfg.epochs} epochs = {steps} steps, {self.device} "
            f"{str(self.dtype).removeprefix('torch.')}{compiled}{fp8}; output {self.ctx.out}"
        )

    @property
    def compiled(self) -> bool:
        """The step runs a torch.compile'd model (false after a compile=auto fallback)."""
        step = getattr(self, "step_fn", None)
        return self._compiled and not (step is not None and step.fell_back)

    # ------------------------------------------------------------------ setup
    def _setup_model(self, init: bool) -> Any:
        """Model on the device (``init``: weights from ``cfg.init`` / ``cfg.init_encoder``; a resumed run takes
        them from its checkpoint), wrapped for DDP or sharded with FSDP; returns the no-sync context."""
        cfg = self.cfg
        self.model = self.method.build(self.model_cfg, self.options).to(self.device)
        # every method's model has the MaskedAutoencoder's ``cfg`` and ``encoder``, all these functions read
        if init and cfg.init:
            init_from_mae(cast(MaskedAutoencoder, self.model), cfg.init)
        elif init and cfg.init_encoder:
            init_from_timm(cast(MaskedAutoencoder, self.model), cfg.init_encoder)
        self.fp8_layers = convert_to_fp8(self.model, cfg.fp8, self.device)
        wrapped: torch.nn.Module = self.model
        self.fsdp = cfg.fsdp and self.dist.enabled
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
        if cfg.fsdp and not self.dist.enabled:
            log.warning("fsdp=true needs torchrun with more than one process: training unsharded")
        if self.fsdp:
            shard_model(self.model, self.model.fsdp_units())  # type: ignore[operator]
            no_sync = partial(_fsdp_no_sync, self.model)
        else:
            wrapped, no_sync = wrap_ddp(self.model, self.dist, self.device)
        # compile=auto: a torch.compile failure here or in the first step means eager, with a warning
        self.forward, self._compiled, self.eager_fallback = compile_or_eager(
            wrapped, cfg.compile, self.device, cfg.compile_mode
        )
        return no_sync

    def _vis_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed images (no augmentation) and fixed noise for comparable reconstruction figures."""
        imgs = self.data.fixed_images(
            NUM_VIS_SAMPLES, self.model_cfg.img_size, self.mean, self.std, self.cfg.data.crop_pct
        )
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        return imgs, self.model.draw_noise(imgs.shape[0], "cpu", gen)  # type: ignore[operator]

    def _knn_sets(self) -> tuple[Any, Any] | None:
        """(memory bank, queries) with the evaluation transform, for the online kNN check."""
        from torch.utils.data import Subset

        from maelab.data import build_dataset, dataset_info, eval_transform

        cfg = self.cfg
        if self.fsdp:
            log.warning("knn_every is ignored with fsdp=true (sharded forward passes need every rank)")
            return None
        if isinstance(self.data.dataset, ShardStream):
            raise ConfigError(
                "knn_every needs an indexable training set, not WebDataset shards: set knn_every=0 "
                "and run maelab knn on an image folder or a saved Hugging Face dataset"
            )
        tf = eval_transform(self.model_cfg.img_size, self.mean, self.std, cfg.data.crop_pct)
        kw = dict(img_size=self.model_cfg.img_size, in_chans=self.model_cfg.in_chans, transform=tf, seed=cfg.seed)
        train = build_dataset(cfg.data, train=True, **kw)
        root = Path(cfg.data.name)
        if cfg.knn_data is None and root.is_dir() and not any((root / d).is_dir() for d in EVAL_SPLIT_DIRS):
            raise ConfigError(
                f"knn_every needs validation images apart from the training folder {root}: "
                "set knn_data=PATH (a labeled folder, e.g. .../test)"
            )
        val_cfg = cfg.data if cfg.knn_data is None else replace(cfg.data, name=cfg.knn_data)
        val = build_dataset(val_cfg, train=False, **kw)
        if not (dataset_info(train)[1] and dataset_info(val)[1]):
            raise ConfigError(
                f"knn_every={cfg.knn_every} needs labeled data: {cfg.data.name!r} "
                "(or knn_data) has no labels; set knn_every=0"
            )
        if dataset_len(train) > cfg.knn_max_train:
            step = dataset_len(train) / cfg.knn_max_train
            train = Subset(train, [int(i * step) for i in range(cfg.knn_max_train)])
        return train, val

    # ------------------------------------------------------------------ loop hooks
    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable[Any]:
        self.data.sampler.set_epoch(epoch, start=start_batch * self.cfg.batch_size)
        return (imgs for imgs, _ in self.data.loader)

    def images_in(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0]) * self.dist.world_size

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        if self.knn_sets is None or epoch % self.cfg.knn_every:
            return {}
        return {"knn_top1": self.knn_top1()}

    def epoch_message(self, record: dict[str, Any]) -> str | None:
        return f"epoch {record['epoch']}: kNN top-1 {record['knn_top1']:.2f}%" if "knn_top1" in record else None

    def knn_top1(self) -> float:
        """kNN top-1 (%) of the current encoder on the monitoring sets."""
        from maelab.eval.knn import knn_monitor

        assert self.knn_sets is not None
        train, val = self.knn_sets
        cfg = self.cfg
        return knn_monitor(
            self.model,
            train,
            val,
            self.device,
            pool="cls" if self.model_cfg.has_class_token else "avg",  # a Swin averages its tokens
            k=cfg.knn_k,
            T=cfg.knn_temperature,
            batch_size=max(cfg.batch_size, 64),
            num_workers=cfg.data.num_workers,
            dtype=self.dtype,
        )

    def end_of_epoch(self, epoch: int, final: bool) -> None:
        if final or epoch % self.cfg.vis_every == 0:
            self.write_figures(epoch)
        elif self.ctx.is_main:
            self.write_loss_curve()

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {
            "mask_gen": self.mask_gen.get_state(),
            "model_config": to_dict(self.model_cfg),
            "method": self.method.name,
            "method_args": to_dict(self.options) if self.options is not None else {},
        }

    def load_extra_state(self, state: dict[str, Any], start_batch: int) -> None:
        path = self.ctx.state_path
        diff = config_mismatch(state.get("model_config", {}), to_dict(self.model_cfg))
        if diff:
            raise CheckpointError(f"{path}: checkpoint was trained with a different model ({'; '.join(diff)})")
        saved_cfg = state.get("config", {})
        saved = (state.get("world_size", 1), saved_cfg.get("data", {}).get("num_workers", self.cfg.data.num_workers))
        now = (self.dist.world_size, self.cfg.data.num_workers)
        if isinstance(self.data.dataset, ShardStream) and start_batch and saved != now:
            log.warning(
                "WebDataset shards: the interrupted epoch continues in another order (the run had %d "
                "processes x %d workers, now %d x %d); the next epochs are exact again",
                *saved,
                *now,
            )
        self.mask_gen.set_state(state["mask_gen"])

    # ------------------------------------------------------------------ outputs
    def write_loss_curve(self) -> None:
        from maelab.engine.metrics import STEP_LOG, read_records
        from maelab.viz import save_loss_curve

        out = self.ctx.out
        records = read_records(out / "metrics.jsonl") + read_records(out / STEP_LOG)
        save_loss_curve(records, out / "figures" / "loss_curve.png")

    @torch.no_grad()
    def write_figures(self, epoch: int) -> Path:
        """Reconstruction grid of the fixed visualization batch, and the loss curve."""
        from maelab.viz import default_title
        from maelab.viz.hog import save_figure

        fig_dir = self.ctx.out / "figures"
        if self.vis_batch is None:  # not rank 0 (and no FSDP collective to join)
            return fig_dir
        imgs, noise = self.vis_batch
        self.model.eval()
        with autocast(self.device, self.dtype):
            out = self.model(imgs.to(self.device), noise=noise.to(self.device))
        self.model.train()
        if not self.ctx.is_main:
            return fig_dir
        images = self.method.figure(self.model_cfg, imgs, out)
        self.write_loss_curve()
        if images is None:  # the method's prediction has no picture
            return fig_dir
        path = fig_dir / f"reconstruction_epoch{epoch:04d}.png"
        title = default_title(
            self.model_cfg.norm_pix_loss,
            self.model_cfg.mask_ratio,
            epoch=epoch,
            method=self.method.name,
            note=figure_note(self.method, self.model_cfg),
        )
        save_figure(images, path, self.mean, self.std, title=title)
        return path


def pretraining_loop(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> Loop:
    """The loop of the pre-training described by ``cfg``, built (model, data, run directory, resumed state) but not
    run: ``loop.p`` is the :class:`Pretraining` protocol."""
    ctx = start_run(cfg, Pretraining.kind, resume=resume, progress=progress)
    return Loop(Pretraining(ctx))


def pretrain(
    cfg: PretrainConfig, resume: bool = False, progress: bool = True, max_steps: int | None = None
) -> RunResult:
    """Run the pre-training described by ``cfg`` on the one loop; see :class:`Pretraining`."""
    return pretraining_loop(cfg, resume=resume, progress=progress).run(max_steps=max_steps)
