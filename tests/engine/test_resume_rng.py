"""A resumed pre-training run continues the stopped run's global random streams (python, numpy,
torch), so anything in the step that draws from them (a drop path, a dropout, an augmentation on
the device) draws after ``--resume`` what the uninterrupted run draws."""

from __future__ import annotations

import random

import numpy as np
import torch
from tests.engine.test_pretrain import tiny_cfg

from maelab.engine.pretrain import pretraining_loop


def run_recording_draws(cfg, resume: bool = False, max_steps: int | None = None) -> list[tuple]:
    """Train, drawing from the three global RNGs at every training forward; returns the draws."""
    loop = pretraining_loop(cfg, resume=resume, progress=False)
    seen: list[tuple] = []

    def draw(module: torch.nn.Module, _) -> None:
        if module.training:  # not the figures' forward
            seen.append((torch.rand(()).item(), float(np.random.rand()), random.random()))

    loop.p.model.register_forward_pre_hook(draw)
    loop.run(max_steps=max_steps)
    return seen


def test_resume_continues_the_global_random_streams(tmp_path):
    full = run_recording_draws(tiny_cfg(tmp_path / "full", epochs=1))
    part = tiny_cfg(tmp_path / "part", epochs=1)
    first = run_recording_draws(part, max_steps=2)
    # start_run reseeds all three RNGs from cfg.seed: only the checkpoint's RNG states make the resumed run go on
    rest = run_recording_draws(part, resume=True)
    assert len(full) == 4 and first == full[:2]
    assert rest == full[2:]
