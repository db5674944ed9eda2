"""Learning-rate schedule: per-iteration linear warmup, then half-cycle cosine (official MAE)."""

from __future__ import annotations

import math


def lr_at(
    step: int | float, *, total_steps: int, warmup_steps: int | float, peak_lr: float, min_lr: float = 0.0
) -> float:
    """lr for optimizer step ``step`` (0-based). Same curve as the official fractional-epoch rule."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
