"""Optimizer construction: AdamW with the official no-decay rule and lr scaling."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Tokens and position embeddings declared by the model (``model.no_weight_decay()``)."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
    decay_tokens: bool = True,
) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D params, and names ending in ``.bias``).

    As the official pre-training (``main_pretrain.py``: timm 0.3.2's ``add_weight_decay`` with no
    skip list) the tokens (``cls_token``, ``mask_token``, [1, 1, D]) are decayed; the fixed
    sin-cos position embeddings are not trained. ``decay_tokens=False`` also exempts the names in
    ``model.no_weight_decay()`` (tokens, position embeddings), as timm's fine-tuning code does.
    ``fused`` defaults to True when every parameter is on CUDA (one kernel for the update).
    """
    skip = () if decay_tokens else no_weight_decay_names(model)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters() if p.requires_grad)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring a per-group ``lr_scale`` (layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
