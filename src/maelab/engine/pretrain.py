"""The MAE pre-training loop.

``pretrain(cfg)`` builds the model, data and optimizer from a :class:`PretrainConfig`, trains
with per-iteration warmup + cosine lr, writes the run directory (``config.yaml``,
``metrics.jsonl`` per epoch, ``steps.jsonl`` per log interval, ``checkpoints/``, ``figures/``) and can resume exactly where it stopped:
data order, augmentation and masking noise are all functions of (seed, epoch, index/step),
and their states are saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from maelab.config import PretrainConfig, batch_summary, save_yaml, to_dict
from maelab.data import build_dataset, default_stats, eval_transform, pretrain_transform
from maelab.data.build import EVAL_SPLIT_DIRS
from maelab.data.folders import ImageFolderDataset
from maelab.data.gpu import (
    FIXED_SIZE_DATASETS,
    DeferredTransform,
    GPUBatchLoader,
    load_uint8_tensor,
    peek_image_sizes,
    plan_gpu_resident,
    uint8_transform,
)
from maelab.data.jpeg_gpu import JPEGDecodeLoader, resolve_decode
from maelab.data.loader import ResumableSampler, build_loader
from maelab.data.prefetch import DeviceBatches
from maelab.data.shards import ShardStream, build_stream_loader
from maelab.engine.accel import compile_or_eager, convert_to_fp8, explain_compile_failure, uses_cudagraphs
from maelab.engine.checkpoint import LAST, atomic_link, atomic_save, config_mismatch, load_resume_state, rotate
from maelab.engine.distributed import (
    all_reduce_mean,
    all_reduce_min,
    barrier,
    full_state_on_rank0,
    load_full_optimizer_state,
    setup_process,
    shard_like,
    shard_model,
)
from maelab.engine.metrics import ENV_FILE, STEP_LOG, MetricsLog
from maelab.engine.optim import build_adamw
from maelab.engine.runtime import autocast, explain_out_of_memory, rng_state, seed_everything, set_rng_state
from maelab.engine.schedule import lr_at
from maelab.engine.signals import StopFlag
from maelab.engine.step import TrainStep
from maelab.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from maelab.io import write_json
from maelab.models.mae import MaskedAutoencoder
from maelab.models.masking import make_noise
from maelab.models.registry import get_config
from maelab.models.weights import init_from_mae, init_from_timm

log = logging.getLogger(__name__)

NUM_VIS_SAMPLES = 8


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    output: Path
    final_loss: float
    step: int
    epoch: int
    stopped_early: bool = False


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    """FSDP2's counterpart of DDP.no_sync: skip the gradient reduce-scatter for a micro-batch."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


class Pretrainer:
    """Holds the state of one pre-training run. ``run()`` trains to the end (or ``max_steps``)."""

    def __init__(self, cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.output)
        self.ckpt_dir = self.out / "checkpoints"
        self.fig_dir = self.out / "figures"
        if not resume and (self.ckpt_dir / LAST).exists():
            raise ConfigError(
                f"{self.out} already holds a run (checkpoints/last.pt): pass --resume to continue it "
                "or choose another --output"
            )
        self.dist, self.device, self.dtype = setup_process(cfg.device, cfg.precision)
        self.is_main = self.dist.is_main
        seed_everything(cfg.seed, cfg.deterministic)  # same on every rank: identical init and masking noise

        self.model_cfg = get_config(cfg.model, **cfg.model_args)
        self.mean, self.std = self._stats()
        no_sync = self._setup_model(init=not resume)
        self._setup_data()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = cfg.resolved_lr(self.dist.world_size)

        self.optimizer = build_adamw(
            self.model, self.peak_lr, cfg.weight_decay, cfg.betas, decay_tokens=cfg.weight_decay_tokens
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # block masks are drawn on the CPU (rectangles, one sample at a time): their generator lives there
        gen_device = "cpu" if self.model_cfg.mask_type == "block" else self.device
        self.mask_gen = torch.Generator(device=gen_device).manual_seed(cfg.seed)
        self.stepper = TrainStep(
            self.model,
            self.optimizer,
            self.device,
            self.dtype,
            self.scaler,
            cfg.grad_clip,
            self.mask_gen,
            forward=self.forward,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            no_sync=no_sync,
            skip_nonfinite=cfg.max_bad_steps > 0,
            all_reduce_min=lambda t: all_reduce_min(t, self.dist),
            cudagraphs=uses_cudagraphs(self.compiled, cfg.compile_mode),
            eager_fallback=self.eager_fallback,
        )
        self.bad_steps = 0
        self.step = 0
        self.epoch = 0
        self.epoch_loss_sum = 0.0  # host-side, for resumed mid-epoch statistics
        self.epoch_steps_done = 0

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")  # one record per epoch
        self.step_log = MetricsLog(self.out / STEP_LOG)  # one record per log_every steps
        if resume:
            self._resume()
        if self.is_main:
            log.info(self.summary())
        barrier(self.dist)  # every rank has read the checkpoint before rank 0 writes anything
        if self.is_main:
            save_yaml(cfg, self.out / "config.yaml")
            self._write_environment()
        self.tb = self._tensorboard() if cfg.tensorboard and self.is_main else None
        self.vis_batch = self._vis_batch() if self.is_main or self.fsdp else None
        self.knn_sets = self._knn_sets() if cfg.knn_every and self.is_main else None

    def summary(self) -> str:
        """One line: what is trained on what, with which batch, lr and length."""
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.gpu_resident:
            data = "GPU-resident"
        elif isinstance(self.loader, JPEGDecodeLoader):
            data = f"{self.cfg.data.num_workers} workers read files, JPEGs decoded on {self.device}"
        else:
            data = f"{self.cfg.data.num_workers} workers"
        return (
            f"pre-training {self.cfg.model} ({params / 1e6:.1f}M trainable params) on {self.cfg.data.name!r} "
            f"({len(self.dataset)} images, {data}); "
            f"{batch_summary(self.cfg.batch_size, self.cfg.accum_steps, self.dist.world_size, self.peak_lr)}, "
            f"{self.cfg.epochs} epochs = {self.total_steps} steps, {self.device} "
            f"{str(self.dtype).removeprefix('torch.')}{self._speed_summary()}; output {self.out}"
            + (f"; resuming at epoch {self.epoch}, step {self.step}" if self.step else "")
        )

    def _write_environment(self) -> None:
        """``env.json``: the versions and the device of this (re)start (``maelab report`` shows them)."""
        from maelab.bench.measure import environment_info

        write_json(environment_info(self.device), self.out / ENV_FILE)

    def _speed_summary(self) -> str:
        compiled = f", torch.compile ({self.cfg.compile_mode})" if self.compiled else ", eager"
        fp8 = f", fp8 {self.cfg.fp8} in {self.fp8_layers} Linear layers" if self.fp8_layers else ""
        return compiled + fp8

    # ------------------------------------------------------------------ setup helpers
    def _setup_model(self, init: bool) -> Callable[[], Any] | None:
        """Model on the device (``init``: weights from ``cfg.init`` / ``cfg.init_encoder``; a resumed run takes
        them from its checkpoint), wrapped for DDP or sharded with FSDP; returns the no-sync context."""
        self.model = MaskedAutoencoder(self.model_cfg).to(self.device)
        if init and self.cfg.init:
            init_from_mae(self.model, self.cfg.init)
        elif init and self.cfg.init_encoder:
            init_from_timm(self.model, self.cfg.init_encoder)
        self.fp8_layers = convert_to_fp8(self.model, self.cfg.fp8, self.device)
        wrapped: torch.nn.Module = self.model
        self.fsdp = self.cfg.fsdp and self.dist.enabled
        self.ddp = None
        no_sync = None
        if self.cfg.fsdp and not self.dist.enabled:
            log.warning("fsdp=true needs torchrun with more than one process: training unsharded")
        if self.fsdp:
            shard_model(self.model, [*self.model.encoder.blocks, *self.model.decoder_blocks])
            no_sync = partial(_fsdp_no_sync, self.model)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            no_sync = self.ddp.no_sync
        # compile=auto: a torch.compile failure here or in the first step means eager, with a warning
        self.forward, self.compiled, self.eager_fallback = compile_or_eager(
            wrapped, self.cfg.compile, self.device, self.cfg.compile_mode
        )
        return no_sync

    def _setup_data(self) -> None:
        """Training set, this rank's resumable sampler, and the loader: GPU-resident, JPEGs decoded on the
        device (``data.decode=gpu``), or the per-sample CPU DataLoader."""
        cfg = self.cfg
        self.dataset, store = self._training_set()
        self.gpu_resident = store is not None
        if len(self.dataset) < cfg.batch_size * self.dist.world_size:
            raise DataError(
                f"dataset {cfg.data.name!r} has {len(self.dataset)} images, fewer than one global batch "
                f"(batch_size={cfg.batch_size} x {self.dist.world_size} processes): lower --batch-size"
            )
        self.sampler: Any = ResumableSampler(
            len(self.dataset), seed=cfg.seed, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size
        )
        per_rank = len(self.sampler)
        self.loader: Any
        if isinstance(self.dataset, ShardStream):  # its own sampler: set_epoch positions the stream
            self.sampler, per_rank = self.dataset, self.dataset.samples_per_rank
            self.loader = DeviceBatches(
                build_stream_loader(
                    self.dataset, cfg.batch_size, cfg.data.num_workers, pin_memory=self.device.type == "cuda"
                ),
                self.device,
                self.mean,
                self.std,
            )
        elif self.gpu_resident:
            images, labels = load_uint8_tensor(
                self.dataset, num_workers=cfg.data.num_workers, progress=self.progress and self.is_main
            )
            self.loader = GPUBatchLoader(
                images.to(self.device),
                labels,
                cfg.batch_size,
                self.sampler,
                self.model_cfg.img_size,
                self.mean,
                self.std,
                min_scale=cfg.data.min_scale,
                hflip=cfg.data.hflip,
                seed=cfg.seed,
            )
        elif resolve_decode(cfg.data.decode) == "gpu":  # DataConfig allows it for image folders only
            self.loader = JPEGDecodeLoader(
                self.dataset,
                cfg.batch_size,
                self.sampler,
                self.model_cfg.img_size,
                self.mean,
                self.std,
                self.device,
                num_workers=cfg.data.num_workers,
                min_scale=cfg.data.min_scale,
                hflip=cfg.data.hflip,
            )
        else:
            self.loader = DeviceBatches(
                build_loader(
                    self.dataset,
                    cfg.batch_size,
                    self.sampler,
                    cfg.data.num_workers,
                    pin_memory=self.device.type == "cuda",
                ),
                self.device,
                self.mean,
                self.std,
            )
        if self.gpu_resident or cfg.data.decode == "gpu":
            log.info("data: %r", self.loader)
        self.batches_per_epoch = per_rank // cfg.batch_size
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"invalid accum_steps={cfg.accum_steps}: an epoch has only "
                f"{self.batches_per_epoch} batches; lower accum_steps or batch_size"
            )

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean_d, std_d = default_stats(self.model_cfg.in_chans)
        mean = self.cfg.data.mean or mean_d
        std = self.cfg.data.std or std_d
        c = self.model_cfg.in_chans
        if len(mean) != c or len(std) != c:
            raise ConfigError(
                f"invalid data.mean/std: need {c} values each (model in_chans={c}), got {len(mean)} and {len(std)}"
            )
        return tuple(mean), tuple(std)

    def _training_set(self) -> tuple[Any, tuple[int, int] | None]:
        """The training set, built once, and the (h, w) to keep it on the device at (None: not GPU-resident).

        ``data.gpu_resident`` is resolved before anything is decoded (:func:`~maelab.data.gpu.plan_gpu_resident`):
        from the stored size of synthetic/cifar10/cifar100/stl10 (one sample), or for a folder from the headers of
        a few evenly spaced files. Then the dataset's transform is set for the path taken: uint8 images for
        :func:`load_uint8_tensor` (fixed-size sets keep their size; folders their common size, or the model's
        input size when the sizes differ), else the per-sample ``pretrain_transform``.
        """
        cfg, data = self.cfg, self.cfg.data
        img_size, in_chans = self.model_cfg.img_size, self.model_cfg.in_chans
        transform = self._transform = DeferredTransform()
        ds = build_dataset(data, img_size=img_size, in_chans=in_chans, train=True, transform=transform, seed=cfg.seed)
        fixed = data.name.lower() in FIXED_SIZE_DATASETS
        mode = data.gpu_resident
        if not (fixed or type(ds) is ImageFolderDataset):  # shards and HF datasets: the CPU DataLoader
            if mode == "on" or data.decode == "gpu":
                raise ConfigError(
                    f"data.gpu_resident=on and data.decode=gpu need an image folder or a built-in "
                    f"dataset, not {data.name!r}: use gpu_resident=auto and decode=cpu"
                )
            mode = "off"
        if mode == "auto" and (self.device.type != "cuda" or data.decode == "gpu"):
            mode = "off"  # an explicit decode=gpu asks for per-batch device decoding
        store = None
        if mode != "off":
            if fixed:
                transform.set(uint8_transform(None))
                sizes = [tuple(int(s) for s in ds[0][0].shape[-2:])]
            else:
                sizes = peek_image_sizes([path for path, _ in ds.samples])
            store = plan_gpu_resident(mode, self.device, len(ds), in_chans, sizes, img_size)
            if store is not None and fixed:
                store = sizes[0]  # fixed-size sets keep their stored size (crops are resized, as on the CPU path)
        if store is not None:
            transform.set(uint8_transform(None if fixed else store))
        else:
            # uint8 crops: DeviceBatches normalizes them on the device (a quarter of the bytes to copy)
            transform.set(
                pretrain_transform(img_size, self.mean, self.std, data.min_scale, data.hflip, normalize=False)
            )
        return ds, store

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "tensorboard=true needs the tensorboard package: pip install 'maelab[tensorboard]'"
            ) from e
        return SummaryWriter(str(self.out / "tensorboard"))

    def _vis_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed images (no augmentation) and fixed noise for comparable reconstruction figures.

        Read from the training set itself with the evaluation transform swapped in for the moment
        (before any DataLoader worker exists), so the set is not built or scanned a second time."""
        ds, training_transform = self.dataset, self._transform.transform
        self._transform.set(eval_transform(self.model_cfg.img_size, self.mean, self.std, self.cfg.data.crop_pct))
        try:
            n = min(NUM_VIS_SAMPLES, len(ds))
            step = max(len(ds) // n, 1)
            if isinstance(ds, ShardStream):  # a stream: its first images
                imgs = torch.stack(ds.head(n, self._transform.transform))
                n = imgs.shape[0]
            else:
                imgs = torch.stack([ds[i * step][0] for i in range(n)])
        finally:
            self._transform.set(training_transform)
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        noise = make_noise(
            self.model_cfg.mask_type, n, self.model_cfg.grid_size, self.model_cfg.mask_ratio, "cpu", generator=gen
        )
        return imgs, noise

    def _knn_sets(self) -> tuple[Any, Any] | None:
        """(memory bank, queries) with the evaluation transform, for the online kNN check."""
        from torch.utils.data import Subset

        from maelab.data import dataset_info

        if self.fsdp:
            log.warning("knn_every is ignored with fsdp=true (sharded forward passes need every rank)")
            return None
        if isinstance(self.dataset, ShardStream):
            raise ConfigError(
                "knn_every needs an indexable training set, not WebDataset shards: set knn_every=0 "
                "and run maelab knn on an image folder or a saved Hugging Face dataset"
            )
        tf = eval_transform(self.model_cfg.img_size, self.mean, self.std, self.cfg.data.crop_pct)
        kw = dict(img_size=self.model_cfg.img_size, in_chans=self.model_cfg.in_chans, transform=tf, seed=self.cfg.seed)
        train = build_dataset(self.cfg.data, train=True, **kw)
        root = Path(self.cfg.data.name)
        if self.cfg.knn_data is None and root.is_dir() and not any((root / d).is_dir() for d in EVAL_SPLIT_DIRS):
            raise ConfigError(
                f"knn_every needs validation images apart from the training folder {root}: "
                "set knn_data=PATH (a labeled folder, e.g. .../test)"
            )
        val_cfg = self.cfg.data if self.cfg.knn_data is None else replace(self.cfg.data, name=self.cfg.knn_data)
        val = build_dataset(val_cfg, train=False, **kw)
        if not (dataset_info(train)[1] and dataset_info(val)[1]):
            raise ConfigError(
                f"knn_every={self.cfg.knn_every} needs labeled data: {self.cfg.data.name!r} "
                "(or knn_data) has no labels; set knn_every=0"
            )
        if len(train) > self.cfg.knn_max_train:
            step = len(train) / self.cfg.knn_max_train
            train = Subset(train, [int(i * step) for i in range(self.cfg.knn_max_train)])
        return train, val

    def knn_top1(self) -> float:
        """kNN top-1 (%) of the current encoder on the monitoring sets."""
        from maelab.eval.knn import knn_monitor

        train, val = self.knn_sets
        return knn_monitor(
            self.model,
            train,
            val,
            self.device,
            k=self.cfg.knn_k,
            T=self.cfg.knn_temperature,
            batch_size=max(self.cfg.batch_size, 64),
            num_workers=self.cfg.data.num_workers,
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, batch_in_epoch: int) -> dict[str, Any]:
        """Everything needed to resume; unsharded (under FSDP a collective, and only rank 0's holds the weights)."""
        if self.fsdp:  # gathered onto rank 0's CPU; the other ranks get empty dicts
            model_sd, optim_sd = full_state_on_rank0(self.model, self.optimizer)
        else:
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "world_size": self.dist.world_size,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": batch_in_epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_steps_done": self.epoch_steps_done,
            "bad_steps": self.bad_steps,
            "mask_gen": self.mask_gen.get_state(),
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "model_config": to_dict(self.model_cfg),
        }

    def save(self, batch_in_epoch: int, periodic: str | None = None) -> Path:
        """Write ``last.pt`` atomically, and name the same file ``periodic`` too (a hard link, or a copy where
        links are unsupported: serialized once); rotate old periodic ones.

        Only rank 0 writes (the weights are identical on every rank; FSDP shards are gathered first)."""
        if not self.is_main and not self.fsdp:
            return self.ckpt_dir / LAST
        state = self.state_dict(batch_in_epoch)
        if not self.is_main:
            return self.ckpt_dir / LAST
        path = atomic_save(state, self.ckpt_dir / LAST)
        if periodic:  # the same bytes: serialized once, linked (or copied) under the periodic name
            atomic_link(path, self.ckpt_dir / periodic)
            rotate(self.ckpt_dir, self.cfg.keep_last)
        return path

    def _resume(self) -> None:
        state, path = load_resume_state(self.ckpt_dir)
        saved_model = state.get("model_config", {})
        diff = config_mismatch(saved_model, to_dict(self.model_cfg))
        if diff:
            raise CheckpointError(f"{path}: checkpoint was trained with a different model ({'; '.join(diff)})")
        saved_cfg = state.get("config", {})
        saved_world = state.get("world_size", 1)
        saved_batch = saved_cfg.get("batch_size", self.cfg.batch_size) * saved_cfg.get("accum_steps", 1) * saved_world
        now_batch = self.cfg.effective_batch(self.dist.world_size)
        if saved_batch != now_batch:
            raise CheckpointError(
                f"{path}: the run used a global batch of {saved_batch} images per step, now it would be "
                f"{now_batch} (batch_size x accum_steps x world_size): keep it the same to resume"
            )
        if saved_cfg.get("seed", self.cfg.seed) != self.cfg.seed:
            raise CheckpointError(
                f"{path}: the run used seed={saved_cfg['seed']}, now seed={self.cfg.seed}: "
                "keep it the same to resume exactly"
            )
        saved_tokens = saved_cfg.get("weight_decay_tokens", False)  # older runs exempted the tokens
        if saved_tokens != self.cfg.weight_decay_tokens:
            raise CheckpointError(
                f"{path}: the run used weight_decay_tokens={str(saved_tokens).lower()} (other "
                "optimizer groups): pass the same value to resume"
            )
        if self.fsdp:
            self.model.load_state_dict(shard_like(state["model"], self.model.state_dict()), strict=True)
            load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        # position in the epoch, in this run's per-rank batches (the world size may have changed)
        samples_done = state["batch_in_epoch"] * saved_cfg.get("batch_size", self.cfg.batch_size) * saved_world
        self._resume_batch = samples_done // (self.cfg.batch_size * self.dist.world_size)
        saved_workers = saved_cfg.get("data", {}).get("num_workers", self.cfg.data.num_workers)
        if (
            isinstance(self.dataset, ShardStream)
            and self._resume_batch
            and (saved_world, saved_workers) != (self.dist.world_size, self.cfg.data.num_workers)
        ):
            log.warning(
                "WebDataset shards: the interrupted epoch continues in another order (the run had %d "
                "processes x %d workers, now %d x %d); the next epochs are exact again",
                saved_world,
                saved_workers,
                self.dist.world_size,
                self.cfg.data.num_workers,
            )
        self.epoch_loss_sum = state.get("epoch_loss_sum", 0.0)
        self.epoch_steps_done = state.get("epoch_steps_done", 0)
        self.bad_steps = state.get("bad_steps", 0)
        self.mask_gen.set_state(state["mask_gen"])
        set_rng_state(state["rng"])
        if self.is_main:
            self.metrics.keep_completed(self.epoch)
            self.step_log.keep_completed(self.epoch, self.step)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # ------------------------------------------------------------------ training
    def lr(self) -> float:
        return lr_at(
            self.step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.peak_lr,
            min_lr=self.cfg.min_lr,
        )

    def train_step(self, batches: list[torch.Tensor]) -> torch.Tensor | None:
        """One optimizer step over ``accum_steps`` micro-batches; returns the mean loss (on device),
        or None when a non-finite loss was skipped (``max_bad_steps``)."""
        with explain_out_of_memory(self.cfg, self.device), explain_compile_failure(self.compiled):
            loss = self.stepper(batches, self.lr())
        self.compiled = self.compiled and not self.stepper.fell_back
        self.step += 1
        if getattr(self.stepper, "last_skipped", False):
            self.bad_steps += 1
            if self.bad_steps > self.cfg.max_bad_steps:
                self._check_finite(float("nan"))
            log.warning(
                "non-finite loss at step %d: update skipped (%d of max_bad_steps=%d)",
                self.step,
                self.bad_steps,
                self.cfg.max_bad_steps,
            )
            return None
        return loss

    def _check_finite(self, loss_value: float) -> None:
        if not math.isfinite(loss_value):
            last = self.ckpt_dir / LAST
            where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"
            raise NonFiniteLossError(
                f"non-finite loss ({loss_value}) at epoch {self.epoch}, step {self.step}; training stopped, {where}. "
                "Try a lower lr, grad_clip=1.0 or precision=fp32"
            )

    def run(self, max_steps: int | None = None, on_epoch_end: Callable[[Pretrainer], None] | None = None) -> RunResult:
        """Train until ``cfg.epochs`` (or ``max_steps`` optimizer steps, then checkpoint and stop)."""
        cfg = self.cfg
        check_every = 1 if self.device.type == "cpu" else cfg.log_every
        start_batch = getattr(self, "_resume_batch", 0)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
        )
        last_loss = float("nan")
        stopped = False
        self.model.train()
        if self.compiled and self.is_main:
            log.info(
                "torch.compile: the first steps compile the model (a minute or more for large models; "
                "compile=off skips it)"
            )
        with StopFlag() as stop:
            while self.epoch < cfg.epochs and not stopped:
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}")
                self.sampler.set_epoch(self.epoch, start=start_batch * cfg.batch_size)
                batch_idx = start_batch
                if start_batch == 0:
                    self.epoch_loss_sum, self.epoch_steps_done = 0.0, 0
                start_batch = 0
                t_epoch, imgs_seen = time.perf_counter(), 0
                window = torch.zeros((), device=self.device)
                window_steps, t_window = 0, time.perf_counter()
                log_sum, log_steps, t_log = 0.0, 0, time.perf_counter()  # host side, for steps.jsonl
                pending: list[torch.Tensor] = []
                for imgs, _ in self.loader:
                    pending.append(imgs)
                    batch_idx += 1
                    if len(pending) < cfg.accum_steps:
                        continue
                    loss = self.train_step(pending)
                    imgs_seen += sum(b.shape[0] for b in pending) * self.dist.world_size
                    pending = []
                    if loss is not None:  # None: a skipped non-finite step
                        window += loss
                        window_steps += 1
                    if window_steps and (self.step % check_every == 0 or self.step % cfg.log_every == 0):
                        value = all_reduce_mean(window, self.dist).item() / window_steps  # the only host sync
                        stop.agree(self.dist)
                        self._check_finite(value)
                        self.epoch_loss_sum += value * window_steps
                        self.epoch_steps_done += window_steps
                        rate = (
                            window_steps
                            * cfg.effective_batch(self.dist.world_size)
                            / max(time.perf_counter() - t_window, 1e-9)
                        )
                        last_loss = value
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.lr():.2e}", img_s=f"{rate:.0f}")
                        log_sum, log_steps = log_sum + value * window_steps, log_steps + window_steps
                        if self.step % cfg.log_every == 0:  # step-level curve: the mean since the last record
                            if self.is_main:
                                self.step_log.append(
                                    {
                                        "step": self.step,
                                        "loss": log_sum / log_steps,
                                        "lr": self.lr(),
                                        "img_per_s": log_steps
                                        * cfg.effective_batch(self.dist.world_size)
                                        / max(time.perf_counter() - t_log, 1e-9),
                                    }
                                )
                            log_sum, log_steps, t_log = 0.0, 0, time.perf_counter()
                        if self.tb is not None:
                            self.tb.add_scalar("train/loss", value, self.step)
                            self.tb.add_scalar("train/lr", self.lr(), self.step)
                        window = torch.zeros((), device=self.device)
                        window_steps, t_window = 0, time.perf_counter()
                    bar.update(1)
                    done_in_epoch = batch_idx
                    hit_max = max_steps is not None and self.step >= max_steps
                    if not self.dist.enabled:
                        stop.agree(self.dist)
                    if stop.signum is not None or hit_max:
                        self._flush_window(window, window_steps)
                        self.save(done_in_epoch)
                        if stop.signum is not None:  # every rank says so: all stop after the same step
                            rank = f" (rank {self.dist.rank})" if self.dist.enabled else ""
                            log.warning(
                                "received signal %d%s: stopped after step %d, saved %s",
                                stop.signum,
                                rank,
                                self.step,
                                self.ckpt_dir / LAST,
                            )
                        stopped = True
                        break
                    if (
                        cfg.save_every_steps
                        and self.step % cfg.save_every_steps == 0
                        and done_in_epoch < self.batches_per_epoch
                    ):
                        self._flush_window(window, window_steps)
                        window = torch.zeros((), device=self.device)
                        window_steps = 0
                        self.save(done_in_epoch, periodic=f"step_{self.step:08d}.pt")
                    if batch_idx >= self.steps_per_epoch * cfg.accum_steps:
                        break
                if stopped:
                    break
                self._flush_window(window, window_steps)
                epoch_loss = self.epoch_loss_sum / max(self.epoch_steps_done, 1)
                last_loss = epoch_loss
                elapsed = time.perf_counter() - t_epoch
                self.epoch += 1
                record = {
                    "epoch": self.epoch,
                    "step": self.step,
                    "loss": epoch_loss,
                    "lr": self.lr(),
                    "img_per_s": imgs_seen / max(elapsed, 1e-9),
                    "epoch_time_s": elapsed,
                    "time": time.time(),
                }
                if self.knn_sets is not None and self.epoch % cfg.knn_every == 0:
                    record["knn_top1"] = self.knn_top1()
                    bar.write(f"epoch {self.epoch}: kNN top-1 {record['knn_top1']:.2f}%")
                if self.is_main:
                    self.metrics.append(record)
                if self.tb is not None:
                    self.tb.add_scalar("epoch/loss", epoch_loss, self.epoch)
                final = self.epoch == cfg.epochs
                if final or self.epoch % cfg.save_every == 0:
                    self.save(0, periodic=None if final else f"epoch_{self.epoch:04d}.pt")
                if final or self.epoch % cfg.vis_every == 0:
                    self.write_figures()
                elif self.is_main:
                    self.write_loss_curve()
                if on_epoch_end is not None:
                    on_epoch_end(self)
        bar.close()
        if self.tb is not None:
            self.tb.close()
        return RunResult(self.out, last_loss, self.step, self.epoch, stopped_early=stopped)

    def _flush_window(self, window: torch.Tensor, window_steps: int) -> None:
        """Fold not-yet-logged steps into the epoch statistics (and check them)."""
        if window_steps:
            value = all_reduce_mean(window, self.dist).item() / window_steps
            self._check_finite(value)
            self.epoch_loss_sum += value * window_steps
            self.epoch_steps_done += window_steps

    # ------------------------------------------------------------------ outputs
    def write_loss_curve(self) -> None:
        from maelab.viz import save_loss_curve

        save_loss_curve(self.metrics.records() + self.step_log.records(), self.fig_dir / "loss_curve.png")

    @torch.no_grad()
    def write_figures(self) -> Path:
        """Reconstruction grid of the fixed visualization batch, and the loss curve."""
        from maelab.viz import default_title, reconstruct, save_reconstruction_grid

        if self.vis_batch is None:  # not rank 0 (and no FSDP collective to join)
            return self.fig_dir
        if self.model_cfg.target != "pixels":  # HOG predictions have no picture to show
            if self.is_main:
                self.write_loss_curve()
            return self.fig_dir
        self.model.eval()
        imgs, noise = self.vis_batch
        with autocast(self.device, self.dtype):
            out = self.model(imgs.to(self.device), noise=noise.to(self.device))
        self.model.train()
        if not self.is_main:
            return self.fig_dir
        images = reconstruct(
            imgs, out.pred.float().cpu(), out.mask.cpu(), self.model_cfg.patch_size, self.model_cfg.norm_pix_loss
        )
        path = self.fig_dir / f"reconstruction_epoch{self.epoch:04d}.png"
        title = default_title(self.model_cfg.norm_pix_loss, self.model_cfg.mask_ratio, epoch=self.epoch)
        save_reconstruction_grid(images, path, self.mean, self.std, title=title)
        self.write_loss_curve()
        return path


def pretrain(
    cfg: PretrainConfig, resume: bool = False, progress: bool = True, max_steps: int | None = None
) -> RunResult:
    """Run MAE pre-training described by ``cfg``; see :class:`Pretrainer`."""
    return Pretrainer(cfg, resume=resume, progress=progress).run(max_steps=max_steps)
