"""The one training loop: pre-training, fine-tuning, partial fine-tuning and the linear probe all run on it.

:class:`Loop` owns what every protocol shares:

- epochs and optimizer steps, gradient accumulation, autocast and the GradScaler (through
  :class:`~maelab.engine.step.TrainStep`), the warmup + cosine lr, the finite-loss policy (``max_bad_steps``);
- preemption: SIGTERM / SIGUSR1 / Ctrl-C save a checkpoint after the current step and stop cleanly; under
  torchrun every rank agrees on the step (:class:`~maelab.engine.signals.StopFlag`);
- checkpoints: ``last.pt`` (atomic, exact mid-epoch resume: sampler position, RNG states of every rank, loss
  statistics), periodic ones (hard links, rotated) and ``best.pt``;
- the records (``metrics.jsonl`` per epoch, ``steps.jsonl`` per ``log_every`` steps, TensorBoard when asked
  for), ``config.yaml``, ``env.json`` and the progress bar (loss, lr, img/s, ETA).

A :class:`Protocol` supplies only what is its own: the model, optimizer and data (built in its constructor
from a :class:`RunContext`), the step's loss, and what to evaluate or draw at the end of an epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from maelab.config import save_yaml, to_dict
from maelab.engine.accel import explain_compile_failure
from maelab.engine.checkpoint import LAST, atomic_link, atomic_save, load_resume_state, rotate
from maelab.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    full_state_on_rank0,
    load_full_optimizer_state,
    setup_process,
    shard_like,
)
from maelab.engine.metrics import ENV_FILE, STEP_LOG, MetricsLog
from maelab.engine.runtime import explain_out_of_memory, rng_state, seed_everything, set_rng_state
from maelab.engine.schedule import lr_at
from maelab.engine.signals import StopFlag
from maelab.engine.step import TrainStep
from maelab.errors import CheckpointError, ConfigError, NonFiniteLossError
from maelab.io import write_json

if TYPE_CHECKING:
    from maelab.data.pipeline import TrainingData

log = logging.getLogger(__name__)

BEST = "best.pt"


@dataclass
class RunContext:
    """What a protocol is built in: its config, process group, device, precision, run directory, and the
    checkpoint being resumed (None for a new run)."""

    cfg: Any
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    out: Path
    progress: bool = True
    state: dict[str, Any] | None = None
    state_path: Path | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def training_data(
        self, img_size: int | tuple[int, int], in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> TrainingData:
        """This rank's training data of ``cfg.data`` for a model of ``img_size`` and ``in_chans``
        (:func:`maelab.data.pipeline.build_training_data` with the run's batch size, seed, device and ranks)."""
        from maelab.data.pipeline import build_training_data

        return build_training_data(
            self.cfg.data,
            img_size=img_size,
            in_chans=in_chans,
            mean=mean,
            std=std,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            progress=self.progress and self.is_main,
        )


def start_run(cfg: Any, kind: str, resume: bool = False, progress: bool = True, overwrite: bool = False) -> RunContext:
    """Join torchrun's process group (if any), seed every RNG alike on every rank, and read the checkpoint to
    resume (every rank reads it). ``kind``: the protocol's checkpoint kind (``--resume`` refuses another one);
    ``overwrite``: a new run may replace an earlier one in the same ``output`` (else that is an error)."""
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    if not resume and not overwrite and (ckpt_dir / LAST).exists():
        raise ConfigError(
            f"{out} already holds a run (checkpoints/last.pt): pass --resume to continue it or choose another --output"
        )
    dist, device, dtype = setup_process(cfg.device, cfg.precision)
    seed_everything(cfg.seed, getattr(cfg, "deterministic", False))  # same on every rank: identical init
    ctx = RunContext(cfg, dist, device, dtype, out, progress)
    if resume:
        state, path = load_resume_state(ckpt_dir)
        saved_kind = state.get("kind", "pretrain")  # pre-training checkpoints had no kind
        if saved_kind != kind:
            raise CheckpointError(
                f"{path}: a {saved_kind} checkpoint, not a {kind} one; --resume continues a `maelab {kind}` run"
            )
        ctx.state, ctx.state_path = state, path
    return ctx


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    output: Path
    final_loss: float
    step: int
    epoch: int
    stopped_early: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    """Evaluating protocols: the last evaluation, best_<metric>, best_epoch, epochs, steps."""


class LossWindow:
    """Step losses kept on the device between host syncs (one per log interval), and the host-side sums of the
    next ``steps.jsonl`` record."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.log_sum, self.log_steps, self.t_log = 0.0, 0, time.perf_counter()
        self.restart()

    def restart(self) -> None:
        self.total = torch.zeros((), device=self.device)
        self.steps = 0
        self.t_start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1


class Protocol:
    """What a training protocol supplies to the :class:`Loop`. Subclasses set, in their constructor:

    ``ctx`` (:class:`RunContext`), ``model`` (the unwrapped module whose weights are saved), ``optimizer``,
    ``step_fn`` (a :class:`TrainStep`) and ``batches_per_epoch`` (this rank's micro-batches per epoch), and
    override the hooks they need."""

    kind: str = "train"
    """Checkpoint kind and progress-bar label."""
    best_metric: str | None = None
    """An :meth:`evaluate` key (higher is better) that ``best.pt`` follows; None: no best checkpoint."""
    resume_keys: dict[str, Any] = {}
    """Config keys that must not change on resume, with the value assumed when an older checkpoint lacks them."""
    fsdp: bool = False

    ctx: RunContext
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: TrainStep
    batches_per_epoch: int

    # ---------------------------------------------------------------- data
    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable[Any]:
        """This rank's micro-batches of ``epoch``, from batch ``start_batch`` on (a resumed epoch)."""
        raise NotImplementedError

    def images_in(self, batch: Any) -> int:
        """Images a micro-batch stands for over all ranks (for img/s)."""
        return int(batch[0].shape[0]) * self.ctx.dist.world_size

    # ---------------------------------------------------------------- hooks
    def train_mode(self) -> None:
        """Put the model in training mode; called before every epoch, a resumed one too."""
        self.model.train()

    def start_epoch(self, epoch: int) -> None:
        """Called before an epoch that starts from its beginning (not when resuming in its middle)."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. an EMA update)."""

    def evaluate(self, epoch: int, final: bool) -> dict[str, float]:
        """Metrics of the epoch's end for ``metrics.jsonl`` (every rank calls it; collectives allowed)."""
        return {}

    def epoch_message(self, record: dict[str, Any]) -> str | None:
        """A line printed under the progress bar at the end of an epoch (rank 0), or None."""
        return None

    def end_of_epoch(self, epoch: int, final: bool) -> None:
        """After the epoch's checkpoint: figures and the like (every rank calls it)."""

    def summary(self) -> str:
        """One line: what is trained on what, with which batch, lr and length."""
        return self.kind

    # ---------------------------------------------------------------- state
    def model_state(self) -> dict[str, Any]:
        """The weights a checkpoint keeps (default: the whole model's state dict)."""
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state, strict=True)

    def extra_state(self) -> dict[str, Any]:
        """What else the protocol needs to resume, or to read its checkpoints (configs, EMA, generators)."""
        return {}

    def load_extra_state(self, state: dict[str, Any], start_batch: int) -> None:
        """Restore :meth:`extra_state` and check the rest of the checkpoint (``start_batch``: where the
        interrupted epoch continues, 0 at an epoch boundary)."""

    def finish(self, result: RunResult) -> None:
        """At the end of a completed run, on every rank (e.g. ``eval.json`` on rank 0)."""


class Loop:
    """Runs a :class:`Protocol` to ``cfg.epochs`` (or ``max_steps``); see the module docstring."""

    def __init__(self, protocol: Protocol) -> None:
        self.p = protocol
        ctx = protocol.ctx
        self.cfg = cfg = ctx.cfg
        self.ctx = ctx
        self.dist = ctx.dist
        self.is_main = ctx.is_main
        self.out = ctx.out
        self.ckpt_dir = ctx.ckpt_dir
        world = self.dist.world_size
        self.steps_per_epoch = protocol.batches_per_epoch // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"invalid accum_steps={cfg.accum_steps}: an epoch has only {protocol.batches_per_epoch} batches; "
                "lower accum_steps or batch_size"
            )
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = cfg.resolved_lr(world)
        self.global_batch = cfg.effective_batch(world)
        self.step = 0
        self.epoch = 0
        self.start_batch = 0
        self.bad_steps = 0
        self.epoch_loss_sum = 0.0  # host-side, for resumed mid-epoch statistics
        self.epoch_steps_done = 0
        self.best: dict[str, Any] = {"value": -math.inf, "epoch": 0}
        self.last_eval: dict[str, Any] = {}

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")  # one record per epoch
        self.step_log = MetricsLog(self.out / STEP_LOG)  # one record per log_every steps
        if ctx.state is not None:
            self._resume(ctx.state, ctx.state_path or self.ckpt_dir / LAST)
        barrier(self.dist)  # every rank has read the checkpoint before rank 0 writes anything
        if self.is_main:
            self.metrics.keep_completed(self.epoch)
            self.step_log.keep_completed(self.epoch, self.step)
            save_yaml(cfg, self.out / "config.yaml")
            self._write_environment()
            log.info(protocol.summary() + (f"; resuming at epoch {self.epoch}, step {self.step}" if self.step else ""))
        self.tb = self._tensorboard() if getattr(cfg, "tensorboard", False) and self.is_main else None

    # ------------------------------------------------------------------ setup
    def _write_environment(self) -> None:
        """``env.json``: the versions and the device of this (re)start (``maelab report`` shows them)."""
        from maelab.bench.measure import environment_info

        write_json(environment_info(self.ctx.device), self.out / ENV_FILE)

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "tensorboard=true needs the tensorboard package: pip install 'maelab[tensorboard]'"
            ) from e
        return SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, batch_in_epoch: int, with_optimizer: bool = True) -> dict[str, Any]:
        """Everything needed to resume; unsharded (under FSDP a collective, and only rank 0's holds the weights).
        Every rank calls it under torchrun (the ranks' RNG states are gathered)."""
        optim_sd: dict[str, Any] | None
        if self.p.fsdp:  # gathered onto rank 0's CPU; the other ranks get empty dicts
            model_sd, optim_sd = full_state_on_rank0(self.p.model, self.p.optimizer)
        else:
            model_sd = self.p.model_state()
            optim_sd = self.p.optimizer.state_dict() if with_optimizer else None
        rngs = rng_state()
        rng_ranks: list[dict[str, Any] | None] = [rngs]
        if self.dist.enabled:
            import torch.distributed as dist

            rng_ranks = [None] * self.dist.world_size
            dist.all_gather_object(rng_ranks, rngs)
        state: dict[str, Any] = {
            "kind": self.p.kind,
            "model": model_sd,
            "world_size": self.dist.world_size,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": batch_in_epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_steps_done": self.epoch_steps_done,
            "bad_steps": self.bad_steps,
            "best": self.best,
            "last_eval": self.last_eval,
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "config": to_dict(self.cfg),
            **self.p.extra_state(),
        }
        if with_optimizer:
            state.update(optimizer=optim_sd, scaler=self.p.step_fn.scaler.state_dict())
        return state

    def save(self, batch_in_epoch: int, periodic: str | None = None) -> Path:
        """Write ``last.pt`` atomically, and name the same file ``periodic`` too (a hard link, or a copy where
        links are unsupported: serialized once); rotate old periodic ones. Only rank 0 writes (the weights are
        identical on every rank; FSDP shards are gathered first); every rank calls it."""
        state = self.state_dict(batch_in_epoch)
        if not self.is_main:
            return self.ckpt_dir / LAST
        path = atomic_save(state, self.ckpt_dir / LAST)
        keep = getattr(self.cfg, "keep_last", 0)
        if periodic and keep > 0:  # the same bytes: serialized once, linked (or copied) under the periodic name
            atomic_link(path, self.ckpt_dir / periodic)
            rotate(self.ckpt_dir, keep)
        return path

    def _check_same(self, saved_cfg: dict[str, Any], path: Path) -> None:
        """The settings that must not change on resume: the global batch and the protocol's ``resume_keys``."""
        saved_world = self.ctx.state.get("world_size", 1) if self.ctx.state else 1
        saved_batch = saved_cfg.get("batch_size", self.cfg.batch_size) * saved_cfg.get("accum_steps", 1) * saved_world
        if saved_batch != self.global_batch:
            raise CheckpointError(
                f"{path}: the run used a global batch of {saved_batch} images per step, now it would be "
                f"{self.global_batch} (batch_size x accum_steps x world_size): keep it the same to resume"
            )
        for key, default in {"seed": self.cfg.seed, **self.p.resume_keys}.items():
            saved, now = saved_cfg.get(key, default), getattr(self.cfg, key)
            if saved != now:
                show = (lambda v: str(v).lower()) if isinstance(now, bool) else repr
                raise CheckpointError(
                    f"{path}: the run used {key}={show(saved)}, now {key}={show(now)}: keep it the same to resume "
                    "exactly"
                )

    def _resume(self, state: dict[str, Any], path: Path) -> None:
        saved_cfg = state.get("config", {})
        self._check_same(saved_cfg, path)
        saved_world = state.get("world_size", 1)
        self.step, self.epoch = state["step"], state["epoch"]
        # position in the epoch, in this run's per-rank batches (the world size may have changed)
        samples_done = state.get("batch_in_epoch", 0) * saved_cfg.get("batch_size", self.cfg.batch_size) * saved_world
        self.start_batch = samples_done // (self.cfg.batch_size * self.dist.world_size)
        self.p.load_extra_state(state, self.start_batch)
        if self.p.fsdp:
            self.p.model.load_state_dict(shard_like(state["model"], self.p.model.state_dict()), strict=True)
            load_full_optimizer_state(self.p.optimizer, state["optimizer"])
        else:
            self.p.load_model_state(state["model"])
            self.p.optimizer.load_state_dict(state["optimizer"])
        self.p.step_fn.scaler.load_state_dict(state["scaler"])
        self.epoch_loss_sum = state.get("epoch_loss_sum", 0.0)
        self.epoch_steps_done = state.get("epoch_steps_done", 0)
        self.bad_steps = state.get("bad_steps", 0)
        best = state.get("best", self.best)
        if "value" not in best:  # fine-tuning checkpoints before the one loop: {"top1": ..., "epoch": ...}
            best = {"value": best.get(self.p.best_metric or "", -math.inf), "epoch": best.get("epoch", 0)}
        self.best = best
        self.last_eval = state.get("last_eval", {})
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world_size else state["rng"])
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

    def train_step(self, batches: list[Any]) -> torch.Tensor | None:
        """One optimizer step over ``accum_steps`` micro-batches; returns the mean loss (on device),
        or None when a non-finite loss was skipped (``max_bad_steps``)."""
        stepper = self.p.step_fn
        compiled = getattr(self.p, "compiled", False)
        with explain_out_of_memory(self.cfg, self.ctx.device), explain_compile_failure(compiled):
            loss = stepper(batches, self.lr())
        self.step += 1
        if stepper.last_skipped:
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
        self.p.after_step(self.step)
        return loss

    def _check_finite(self, loss_value: float) -> None:
        if not math.isfinite(loss_value):
            last = self.ckpt_dir / LAST
            where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"
            raise NonFiniteLossError(
                f"non-finite loss ({loss_value}) at epoch {self.epoch + 1}, step {self.step}; training stopped, "
                f"{where}. Try a lower lr, grad_clip=1.0 or precision=fp32"
            )

    def _flush(self, window: LossWindow) -> float | None:
        """Fold the window's steps into the epoch's statistics and the next ``steps.jsonl`` record: their mean
        loss over all ranks (the host sync), checked; None for an empty window. The window starts afresh."""
        if not window.steps:
            return None
        value = all_reduce_mean(window.total, self.dist).item() / window.steps
        self._check_finite(value)
        self.epoch_loss_sum += value * window.steps
        self.epoch_steps_done += window.steps
        window.log_sum += value * window.steps
        window.log_steps += window.steps
        window.restart()
        return value

    def _log(self, window: LossWindow, stop: StopFlag, bar: Any) -> float:
        """A log interval: the loss and throughput on the progress bar, ``steps.jsonl`` every ``log_every`` steps,
        TensorBoard; under torchrun the ranks agree here whether a stop signal arrived."""
        steps, elapsed = window.steps, max(time.perf_counter() - window.t_start, 1e-9)
        value = self._flush(window)
        assert value is not None
        stop.agree(self.dist)
        lr = self.lr()
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{steps * self.global_batch / elapsed:.0f}")
        if self.step % self.cfg.log_every == 0:  # step-level curve: the mean since the last record
            if self.is_main:
                since = max(time.perf_counter() - window.t_log, 1e-9)
                self.step_log.append(
                    {
                        "step": self.step,
                        "loss": window.log_sum / window.log_steps,
                        "lr": lr,
                        "img_per_s": window.log_steps * self.global_batch / since,
                    }
                )
            window.log_sum, window.log_steps, window.t_log = 0.0, 0, time.perf_counter()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", value, self.step)
            self.tb.add_scalar("train/lr", lr, self.step)
        return value

    def run(self, max_steps: int | None = None) -> RunResult:
        """Train until ``cfg.epochs`` (or ``max_steps`` optimizer steps, then checkpoint and stop)."""
        cfg, p = self.cfg, self.p
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.ctx.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
        )
        last_loss = float("nan")
        stopped = False
        start_batch, self.start_batch = self.start_batch, 0
        with StopFlag() as stop:
            while self.epoch < cfg.epochs and not stopped:
                stopped, loss = self._run_epoch(start_batch, bar, stop, max_steps)
                start_batch = 0
                last_loss = last_loss if loss is None else loss
        bar.close()
        if self.tb is not None:
            self.tb.close()
        result = RunResult(self.out, last_loss, self.step, self.epoch, stopped_early=stopped)
        if p.best_metric is not None:
            result.metrics = {
                **self.last_eval,
                f"best_{p.best_metric}": self.best["value"],
                "best_epoch": self.best["epoch"],
                "epochs": self.epoch,
                "steps": self.step,
            }
        if not stopped:
            p.finish(result)
            barrier(self.dist)  # the outputs exist when any rank returns
        return result

    def _run_epoch(
        self, start_batch: int, bar: Any, stop: StopFlag, max_steps: int | None
    ) -> tuple[bool, float | None]:
        """One epoch from batch ``start_batch`` (a resumed one from its middle). Returns (stopped, the last loss:
        the epoch's mean, or when stopped by a signal or ``max_steps`` the last logged one)."""
        cfg, p = self.cfg, self.p
        check_every = 1 if self.ctx.device.type == "cpu" else cfg.log_every
        batches_per_epoch = self.steps_per_epoch * cfg.accum_steps
        bar.set_description(f"{p.kind} {self.epoch + 1}/{cfg.epochs}")
        if start_batch == 0:
            self.epoch_loss_sum, self.epoch_steps_done = 0.0, 0
            p.start_epoch(self.epoch)
        p.train_mode()
        batch_idx = start_batch
        t_epoch, imgs_seen = time.perf_counter(), 0
        window = LossWindow(self.ctx.device)
        last: float | None = None
        pending: list[Any] = []
        for batch in p.epoch_batches(self.epoch, batch_idx):
            pending.append(batch)
            batch_idx += 1
            if len(pending) < cfg.accum_steps:
                continue
            loss = self.train_step(pending)
            imgs_seen += sum(p.images_in(b) for b in pending)
            pending = []
            if loss is not None:  # None: a skipped non-finite step
                window.add(loss)
            if window.steps and (self.step % check_every == 0 or self.step % cfg.log_every == 0):
                last = self._log(window, stop, bar)
            bar.update(1)
            if not self.dist.enabled:
                stop.agree(self.dist)
            if stop.signum is not None or (max_steps is not None and self.step >= max_steps):
                self._flush(window)
                self.save(batch_idx)
                if stop.signum is not None:  # every rank says so: all stop after the same step
                    rank = f" (rank {self.dist.rank})" if self.dist.enabled else ""
                    log.warning(
                        "received signal %d%s: stopped after step %d, saved %s",
                        stop.signum,
                        rank,
                        self.step,
                        self.ckpt_dir / LAST,
                    )
                return True, last
            if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and batch_idx < batches_per_epoch:
                self._flush(window)
                self.save(batch_idx, periodic=f"step_{self.step:08d}.pt")
            if batch_idx >= batches_per_epoch:
                break
        self._flush(window)
        return False, self._end_epoch(bar, imgs_seen, time.perf_counter() - t_epoch)

    def _end_epoch(self, bar: Any, imgs_seen: int, elapsed: float) -> float:
        """Record the finished epoch: evaluation, best.pt, metrics.jsonl, checkpoint, figures. Returns its loss."""
        cfg, p = self.cfg, self.p
        epoch_loss = self.epoch_loss_sum / max(self.epoch_steps_done, 1)
        self.epoch += 1
        final = self.epoch == cfg.epochs
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "loss": epoch_loss,
            "lr": self.lr(),
            "img_per_s": imgs_seen / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }
        ev = p.evaluate(self.epoch, final)
        if ev:
            record.update(ev)
            self.last_eval = dict(ev)
            name = p.best_metric
            if name is not None and name in ev:
                if ev[name] > self.best["value"]:
                    self.best = {"value": ev[name], "epoch": self.epoch}
                    best_state = self.state_dict(0, with_optimizer=False)
                    if self.is_main:
                        atomic_save(best_state, self.ckpt_dir / BEST)
                record[f"best_{name}"] = self.best["value"]
        record["time"] = time.time()
        message = p.epoch_message(record)
        if self.is_main:
            if message:
                bar.write(message)
            self.metrics.append(record)
        if self.tb is not None:
            self.tb.add_scalar("epoch/loss", epoch_loss, self.epoch)
            for key, value in ev.items():
                self.tb.add_scalar(f"epoch/{key}", value, self.epoch)
        if final or self.epoch % cfg.save_every == 0:
            self.save(0, periodic=None if final else f"epoch_{self.epoch:04d}.pt")
        p.end_of_epoch(self.epoch, final)
        return epoch_loss
