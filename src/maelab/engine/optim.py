"""Optimizer construction: AdamW with the paper's no-decay rule and lr scaling."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Tokens and position embeddings declared by the model (``model.no_weight_decay()``)."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases (1-D params), position embeddings and tokens.

    ``fused`` defaults to True when every parameter is on CUDA (one kernel for the update).
    """
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters() if p.requires_grad)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring a per-group ``lr_scale`` (layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
