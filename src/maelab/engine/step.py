"""One MAE optimizer step, shared by the training loop and ``maelab bench``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from maelab.engine.accel import is_compile_failure, warn_compile_fallback
from maelab.engine.optim import set_lr
from maelab.engine.runtime import autocast, rng_state, set_rng_state
from maelab.models.mae import MAEOutput, MaskedAutoencoder
from maelab.models.masking import make_noise


class TrainStep:
    """forward (autocast) + backward over micro-batches, optional clipping, optimizer update.

    ``forward`` is the model, its DDP wrapper or their ``torch.compile``d version. Masking
    noise comes from ``generator``, which every rank seeds alike: each rank gets its own rows of the
    global batch's noise (``[rank::world_size]``, the rows of its samples in the sampler's interleaved
    split; block masks are drawn for those rows only) and the generator advances as for the whole
    batch. So a run's masks can be saved and resumed, and N processes compute exactly what one
    process does with the same global batch.
    """

    def __init__(
        self,
        model: MaskedAutoencoder,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        dtype: torch.dtype,
        scaler: torch.amp.GradScaler | None = None,
        grad_clip: float | None = None,
        generator: torch.Generator | None = None,
        forward: Callable[..., MAEOutput] | None = None,
        rank: int = 0,
        world_size: int = 1,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        skip_nonfinite: bool = False,
        all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cudagraphs: bool = False,
        eager_fallback: Callable[..., MAEOutput] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.dtype = dtype
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.grad_clip = grad_clip
        self.generator = generator
        self.forward = forward if forward is not None else model
        self.rank = rank
        self.world_size = world_size
        self.no_sync = no_sync
        self.skip_nonfinite = skip_nonfinite
        self.all_reduce_min = all_reduce_min
        self.last_skipped = False
        self.cudagraphs = (
            cudagraphs  # forward is compiled with CUDA graphs (compile_mode reduce-overhead / max-autotune)
        )
        self.eager_fallback = eager_fallback  # compile=auto: what runs if the first compiled step fails
        self.fell_back = False
        cfg = model.cfg
        self._noise_args = (cfg.mask_type, cfg.grid_size, cfg.mask_ratio)

    def noise(self, batch_size: int) -> torch.Tensor:
        """This rank's rows of the global batch's noise: [batch_size, L]."""
        kind, grid, ratio = self._noise_args
        total = batch_size * self.world_size
        return make_noise(
            kind,
            total,
            grid,
            ratio,
            self.device,
            generator=self.generator,
            rows=range(self.rank, total, self.world_size) if self.world_size > 1 else None,
        )

    def __call__(self, batches: list[torch.Tensor], lr: float) -> torch.Tensor:
        """One optimizer step over the micro-batches; returns the mean loss as a device tensor."""
        if self.eager_fallback is None:
            return self._step(batches, lr)
        return self._first_step_or_eager(batches, lr)

    def _first_step_or_eager(self, batches: list[torch.Tensor], lr: float) -> torch.Tensor:
        """The first compiled step under compile=auto. If torch.compile fails in it (while compiling the forward
        or the backward), what the failed try left is undone (accumulated gradients, masking noise drawn from
        ``generator``, draws from the global RNGs; the optimizer has not stepped yet) and the same step runs
        eagerly, after one warning; every later step is eager too."""
        eager, self.eager_fallback = self.eager_fallback, None
        noise_state = self.generator.get_state() if self.generator is not None else None
        rngs = rng_state()
        try:
            return self._step(batches, lr)
        except Exception as e:
            if not is_compile_failure(e):
                raise
            warn_compile_fallback(e)
        self.optimizer.zero_grad(set_to_none=True)
        if noise_state is not None:
            self.generator.set_state(noise_state)  # type: ignore[union-attr]
        set_rng_state(rngs)
        self.forward, self.cudagraphs, self.fell_back = eager, False, True
        return self._step(batches, lr)

    def _step(self, batches: list[torch.Tensor], lr: float) -> torch.Tensor:
        """One optimizer step with ``forward``."""
        set_lr(self.optimizer, lr)
        if self.cudagraphs:  # a new iteration: the last step's graph outputs (its gradients) are dead now
            torch.compiler.cudagraph_mark_step_begin()
        total = torch.zeros((), device=self.device)
        for i, imgs in enumerate(batches):
            imgs = imgs.to(self.device, non_blocking=True)
            last = i == len(batches) - 1
            # DDP: all-reduce gradients once, on the last micro-batch
            sync = contextlib.nullcontext() if last or self.no_sync is None else self.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    loss = self.forward(imgs, noise=self.noise(imgs.shape[0])).loss
                self.scaler.scale(loss / len(batches)).backward()
            total += loss.detach().float()
        self.last_skipped = False
        if self.skip_nonfinite:  # one host sync per step, only when skipping is asked for
            finite = torch.isfinite(total).float()
            if self.all_reduce_min is not None:
                finite = self.all_reduce_min(finite)
            if not bool(finite.item()):
                self.optimizer.zero_grad(set_to_none=True)
                self.last_skipped = True
                return total / len(batches)
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batches)
