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


def assert_weights_close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    """State dicts equal within fp32 tolerance, except the key part of qkv biases.

    The key bias has an exactly-zero gradient (softmax is shift invariant), so its gradient is
    pure rounding noise that Adam scales up to lr-sized steps: two correct implementations that
    round differently disagree there, and nowhere else.
    """
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].float(), b[k].float()
        if k.endswith("attn.qkv.bias"):
            width = x.shape[0] // 3
            keep = torch.ones_like(x, dtype=torch.bool)
            keep[width:2 * width] = False
            x, y = x[keep], y[keep]
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=k)


def load_script(name: str):
    """The module of ``scripts/<name>.py`` (scripts are not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
