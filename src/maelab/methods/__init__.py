"""Pre-training methods: each turns images (and masking noise) into a loss and what the figures need.

A method is a :class:`Method` in :data:`METHODS`, selected by name. Its model is an ``nn.Module`` with

- ``forward(imgs [B, C, H, W], noise=[B, L] | None) -> output`` whose ``loss`` is a scalar (``pred`` and
  ``mask`` feed the figures);
- ``cfg`` (a :class:`~maelab.config.ModelConfig`: masking type, ratio and patch grid) and ``encoder``
  (a timm ``VisionTransformer``: what fine-tuning, probing, kNN, embed and export use);
- ``fsdp_units()``: the blocks FSDP shards one by one.

The training loop, the checkpoint format, export and the figures do not branch on the method: the
pre-training protocol asks the registry entry to build the model and to draw its figure. Adding a method
is one module (its model, or a wrapper around one) and one entry in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maelab.config import ModelConfig
from maelab.errors import ConfigError
from maelab.methods.noise import MaskingNoise, masked_image_loss, pretrain_step


@dataclass(frozen=True)
class Method:
    """A registered pre-training method."""

    name: str
    summary: str
    build: Callable[[ModelConfig], nn.Module]
    """ModelConfig -> the model (see the module docstring for its interface)."""
    figure: Callable[[ModelConfig, torch.Tensor, Any], dict[str, torch.Tensor] | None]
    """(model config, images [B, C, H, W], forward output) -> the reconstruction figure's images, or None when
    the method's prediction has no picture (e.g. HOG features)."""


def _mae_figure(cfg: ModelConfig, imgs: torch.Tensor, out: Any) -> dict[str, torch.Tensor] | None:
    from maelab.viz import reconstruct

    if cfg.target != "pixels":  # HOG predictions have no picture to show
        return None
    return reconstruct(imgs, out.pred.float().cpu(), out.mask.cpu(), cfg.patch_size, cfg.norm_pix_loss)


def _build_mae(cfg: ModelConfig) -> nn.Module:
    from maelab.models.mae import MaskedAutoencoder

    return MaskedAutoencoder(cfg)


METHODS: dict[str, Method] = {
    "mae": Method(
        "mae",
        "MAE (He et al. 2022): encoder on the visible patches, light decoder, MSE on the hidden patches",
        _build_mae,
        _mae_figure,
    ),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; a one-line ConfigError listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"invalid method={name!r}: one of {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "MaskingNoise", "get_method", "masked_image_loss", "pretrain_step"]
