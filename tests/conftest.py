"""Shared fixtures: tiny model arguments and the optional real CIFAR-10 copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = (REPO.parent / "shared" / "data" / "cifar10").resolve()

# A model small enough for end-to-end CPU tests (about 0.2M parameters).
TINY_MODEL_ARGS = dict(embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture
def tiny_model_args() -> dict:
    return dict(TINY_MODEL_ARGS)


@pytest.fixture
def cifar10_dir() -> Path:
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"real CIFAR-10 copy not present at {SHARED_CIFAR10}")
    return SHARED_CIFAR10
