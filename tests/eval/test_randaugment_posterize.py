"""RandAugment's posterize at 0 bits kept: a black image (Pillow 12's result), not Pillow 13's ValueError that
crashed fine-tuning in a DataLoader worker when ``rand-m9-mstd0.5``'s magnitude noise reached 10."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps
from timm.data.auto_augment import AugmentOp

from maelab.config import build_config
from maelab.eval.config import FinetuneConfig
from maelab.eval.finetune import _posterize, finetune_train_transform, zero_bit_posterize


def random_image(mode: str = "RGB", size: int = 32, seed: int = 0) -> Image.Image:
    """A PIL image of uniform random pixels (every intensity level present, so posterize changes it)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def augment_ops(transform: Any) -> list[AugmentOp]:
    """Every timm AugmentOp inside ``transform`` (our wrapper, Compose, RandAugment/AugMix ops, AutoAugment policy),
    walked independently of ``zero_bit_posterize``'s own walk."""
    found, stack = [], [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp):
            found.append(t)
        for attr in ("transform", "transforms", "ops"):
            sub = getattr(t, attr, None)
            if sub is not None:
                stack.extend(sub if isinstance(sub, (list, tuple)) else [sub])
        for sub_policy in getattr(t, "policy", None) or []:
            stack.extend(sub_policy)
    return found


def assert_black(out: Image.Image, img: Image.Image) -> None:
    assert out.mode == img.mode and out.size == img.size
    assert np.asarray(out).max() == 0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_increasing_at_magnitude_10_gives_a_black_image(mode):
    op = zero_bit_posterize(AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={"magnitude_std": 0}))
    assert op.level_fn(10, op.hparams) == (0,)  # the 0 bits Pillow 13 refuses
    img = random_image(mode)
    assert_black(op(img), img)  # and no ValueError


@pytest.mark.parametrize(
    "auto_augment",
    [
        "rand-m9-mstd0.5-inc1",  # the recipes' RandAugment: PosterizeIncreasing has 0 bits at magnitude 10
        "v0",  # an AutoAugment policy (ops in sub-policies): its 'Posterize' keeps 0 bits at magnitude 0..2
    ],
)
def test_finetune_train_transform_patches_every_posterize_op(auto_augment):
    cfg = build_config(FinetuneConfig, None, {"checkpoint": "ckpt.pt", "auto_augment": auto_augment})
    tf = finetune_train_transform(cfg, 32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    posterize_ops = [op for op in augment_ops(tf) if op.name.startswith("Posterize")]
    img = random_image()
    forced = 0
    for op in posterize_ops:
        # force the op at a magnitude that keeps 0 bits (10 for PosterizeIncreasing), always applied, no noise
        zero_bits = [m for m in range(11) if op.level_fn(m, op.hparams) == (0,)]
        if not zero_bits:
            continue
        op.prob, op.magnitude, op.magnitude_std = 1.0, zero_bits[-1], 0
        assert_black(op(img), img)  # and no ValueError
        forced += 1
    assert forced > 0, f"no posterize op that keeps 0 bits in {tf!r}"


def test_posterize_matches_pillow_except_at_0_bits():
    img = random_image(seed=1)
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(_posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    for bits in (8, 9):  # timm's posterize: 8 or more bits kept is the image itself (Pillow refuses 9)
        assert np.array_equal(np.asarray(_posterize(img, bits)), np.asarray(img))
