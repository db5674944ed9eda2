"""One optimizer step, for every protocol: the training loop's and ``maelab bench``'s.

A protocol supplies a loss function ``loss_fn(forward, micro_batch) -> scalar loss``; the step runs it under
autocast for each micro-batch, backpropagates (scaled under fp16), all-reduces gradients once (DDP/FSDP
``no_sync`` on the other micro-batches), clips, and updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from maelab.engine.accel import is_compile_failure, warn_compile_fallback
from maelab.engine.optim import set_lr
from maelab.engine.runtime import autocast, rng_state, set_rng_state

LossFn = Callable[[Callable[..., Any], Any], torch.Tensor]
"""``(forward, micro_batch) -> scalar loss``: what a protocol computes for one micro-batch."""


class TrainStep:
    """forward (autocast) + backward over micro-batches, optional clipping, optimizer update.

    ``forward`` is the model, its DDP wrapper or their ``torch.compile``d version; ``loss_fn`` calls it.
    ``generators``: RNGs that the loss function draws from (masking noise); under ``compile=auto`` a first step
    whose compilation fails is undone (their states and the global RNGs restored) and repeated eagerly with
    ``eager_fallback``.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        dtype: torch.dtype,
        *,
        parameters: Iterable[torch.nn.Parameter] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        grad_clip: float | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        skip_nonfinite: bool = False,
        all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cudagraphs: bool = False,
        eager_fallback: Callable[..., Any] | None = None,
        generators: Sequence[torch.Generator] = (),
    ) -> None:
        self.forward = forward
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = device
        self.dtype = dtype
        self.parameters = (
            list(parameters) if parameters is not None else [p for g in optimizer.param_groups for p in g["params"]]
        )
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.grad_clip = grad_clip
        self.no_sync = no_sync
        self.skip_nonfinite = skip_nonfinite
        self.all_reduce_min = all_reduce_min
        self.cudagraphs = cudagraphs  # forward is compiled with CUDA graphs (reduce-overhead / max-autotune)
        self.eager_fallback = eager_fallback  # compile=auto: what runs if the first compiled step fails
        self.generators = list(generators)
        self.last_skipped = False
        self.fell_back = False

    def __call__(self, batches: Sequence[Any], lr: float) -> torch.Tensor:
        """One optimizer step over the micro-batches; returns the mean loss as a device tensor."""
        if self.eager_fallback is None:
            return self._step(batches, lr)
        return self._first_step_or_eager(batches, lr)

    def _first_step_or_eager(self, batches: Sequence[Any], lr: float) -> torch.Tensor:
        """The first compiled step under compile=auto. If torch.compile fails in it (while compiling the forward
        or the backward), what the failed try left is undone (accumulated gradients, draws from ``generators``
        and from the global RNGs; the optimizer has not stepped yet) and the same step runs eagerly, after one
        warning; every later step is eager too."""
        eager, self.eager_fallback = self.eager_fallback, None
        states = [g.get_state() for g in self.generators]
        rngs = rng_state()
        try:
            return self._step(batches, lr)
        except Exception as e:
            if not is_compile_failure(e):
                raise
            warn_compile_fallback(e)
        self.optimizer.zero_grad(set_to_none=True)
        for g, s in zip(self.generators, states):
            g.set_state(s)
        set_rng_state(rngs)
        assert eager is not None
        self.forward, self.cudagraphs, self.fell_back = eager, False, True
        return self._step(batches, lr)

    def _step(self, batches: Sequence[Any], lr: float) -> torch.Tensor:
        """One optimizer step with ``forward``."""
        set_lr(self.optimizer, lr)
        if self.cudagraphs:  # a new iteration: the last step's graph outputs (its gradients) are dead now
            torch.compiler.cudagraph_mark_step_begin()
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # DDP/FSDP: all-reduce gradients once, on the last micro-batch
            sync = contextlib.nullcontext() if last or self.no_sync is None else self.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    loss = self.loss_fn(self.forward, batch)
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
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batches)
