"""Masking noise for a training step, and the loss function of a masked-image model.

Every rank seeds the noise generator alike: each rank gets its own rows of the global batch's noise
(``[rank::world_size]``, the rows of its samples in the sampler's interleaved split; block masks are drawn
for those rows only) and the generator advances as for the whole batch. So a run's masks can be saved and
resumed, and N processes compute exactly what one process does with the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from maelab.engine.step import LossFn, TrainStep


class MaskingNoise:
    """This rank's rows of each global batch's masking noise, drawn from one generator by the model's own
    masking (``model.draw_noise(batch_size, device, generator, rows)``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.draw: Callable[..., torch.Tensor] = model.draw_noise  # type: ignore[assignment]
        self.device = device
        self.generator = generator
        self.rank = rank
        self.world_size = world_size

    def __call__(self, batch_size: int) -> torch.Tensor:
        """Noise [batch_size, L] for this rank's ``batch_size`` images of a global batch."""
        total = batch_size * self.world_size
        rows = range(self.rank, total, self.world_size) if self.world_size > 1 else None
        return self.draw(total, self.device, self.generator, rows)


def masked_image_loss(noise: MaskingNoise) -> LossFn:
    """``(forward, images [B, C, H, W]) -> forward(images on the device, noise=[B, L]).loss``."""

    def loss(forward: Callable[..., Any], imgs: torch.Tensor) -> torch.Tensor:
        imgs = imgs.to(noise.device, non_blocking=True)
        return forward(imgs, noise=noise(imgs.shape[0])).loss

    return loss


def pretrain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dtype: torch.dtype,
    *,
    generator: torch.Generator | None = None,
    forward: Callable[..., Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    **step_options: Any,
) -> TrainStep:
    """The training step of a masked-image model (``model.cfg`` gives the masking): a :class:`TrainStep` whose
    loss draws this rank's masking noise from ``generator``. ``step_options``: TrainStep's keyword options."""
    noise = MaskingNoise(model, device, generator, rank, world_size)
    return TrainStep(
        forward if forward is not None else model,
        masked_image_loss(noise),
        optimizer,
        device,
        dtype,
        parameters=model.parameters(),
        generators=[generator] if generator is not None else [],
        **step_options,
    )
