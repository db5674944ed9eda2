"""The paper's pre-training settings, asserted on what a real ``pretraining_loop`` builds from the default
config (nothing but the model size and the data overridden): AdamW betas (0.9, 0.95), weight
decay 0.05 on weights only, lr = 1.5e-4 x effective batch / 256, RandomResizedCrop(0.2-1,
bicubic) + flip p=0.5 on both data paths."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from maelab.config import PretrainConfig, build_config
from maelab.data.loaders import GPUBatchLoader
from maelab.engine.loop import Loop
from maelab.engine.pretrain import pretraining_loop


def default_loop(output, **kw) -> Loop:
    overrides = {
        "model": "mae_vit_pico_patch4_32",
        "output": str(output),
        "batch_size": 16,
        "data.num_samples": 64,
        "data.num_workers": 0,
        **{f"model_args.{k}": v for k, v in TINY_MODEL_ARGS.items()},
        **kw,
    }
    return pretraining_loop(build_config(PretrainConfig, None, overrides), progress=False)


def test_optimizer_has_the_paper_settings(tmp_path):
    loop = default_loop(tmp_path, accum_steps=2)
    groups = loop.p.optimizer.param_groups
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    names = {p: n for n, p in loop.p.model.named_parameters()}
    for g in groups:  # as the official code: decay on all but 1-D params (norms, biases), tokens included
        for p in g["params"]:
            decayed = p.ndim > 1
            assert g["weight_decay"] == (0.05 if decayed else 0.0), names[p]
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}
    assert loop.peak_lr == pytest.approx(1.5e-4 * (16 * 2) / 256)


def test_cpu_crops_have_the_paper_settings(tmp_path):
    data = default_loop(tmp_path, **{"data.gpu_resident": "off"}).p.data
    ops = {type(t): t for t in data.transform.transform.transforms}
    crop, flip = ops[v2.RandomResizedCrop], ops[v2.RandomHorizontalFlip]
    assert crop.scale == (0.2, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC and crop.antialias
    assert flip.p == 0.5


def test_gpu_resident_crops_have_the_paper_settings(tmp_path):
    loader = default_loop(tmp_path, **{"data.gpu_resident": "on"}).p.data.loader
    assert isinstance(loader, GPUBatchLoader)
    assert loader.scale == (0.2, 1.0) and loader.ratio == pytest.approx((3 / 4, 4 / 3))
    assert loader.hflip and loader.antialias  # flip p=0.5 and bicubic: tests/data/test_data_augmentation.py
    assert loader.images.dtype == torch.uint8
