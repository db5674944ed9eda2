"""Tiny models of every pre-training method and a fixed batch of smooth images, for CPU tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from maelab.config import ModelConfig
from maelab.methods import get_method, method_model_config, method_options

TINY = dict(depth=2, decoder_depth=1, embed_dim=64, num_heads=4, decoder_embed_dim=64, decoder_num_heads=4)
"""32 px images, 4 px patches (L = 64): a 2-block encoder of width 64 and a 1-block decoder."""


def tiny_config(method: str, **model_args: Any) -> ModelConfig:
    """The tiny preset with ``method``'s model defaults and ``model_args`` on top."""
    return method_model_config(get_method(method), "mae_vit_tiny_patch4_32", {**TINY, **model_args})


def build(method: str, method_args: dict[str, Any] | None = None, **model_args: Any) -> torch.nn.Module:
    """A tiny model of ``method`` (seeded, so every test starts from the same weights)."""
    torch.manual_seed(0)
    m = get_method(method)
    return m.build(tiny_config(method, **model_args), method_options(m, method_args or {}))


def smooth_images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    """[batch, 3, 32, 32] images (bilinear upsampling of 8x8 noise): structure a tiny model can learn."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 3, 8, 8, generator=gen)
    return F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
