import math

import pytest
import torch
from tests.conftest import TINY_MODEL_ARGS

import maelab
from maelab.engine.optim import build_adamw, set_lr
from maelab.engine.schedule import lr_at


def official_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """facebookresearch/mae util/lr_sched.adjust_learning_rate, re-typed."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_lr_matches_official_fractional_epoch_rule(warmup_epochs):
    steps_per_epoch, epochs, peak, floor = 7, 10, 2e-3, 1e-5
    for step in range(steps_per_epoch * epochs):
        ours = lr_at(
            step,
            total_steps=steps_per_epoch * epochs,
            warmup_steps=warmup_epochs * steps_per_epoch,
            peak_lr=peak,
            min_lr=floor,
        )
        ref = official_lr(step / steps_per_epoch, peak, floor, warmup_epochs, epochs)
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_lr_warmup_is_linear_from_zero_and_peaks():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, peak_lr=1.0) for s in range(100)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5)
    assert max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine decays monotonically


def test_resolved_lr_scales_with_effective_batch():
    cfg = maelab.PretrainConfig(batch_size=64, accum_steps=4, base_lr=1.5e-4)
    assert cfg.resolved_lr() == pytest.approx(1.5e-4 * 256 / 256)
    assert cfg.resolved_lr(world_size=8) == pytest.approx(1.5e-4 * 2048 / 256)
    assert maelab.PretrainConfig(lr=3e-3).resolved_lr(world_size=8) == 3e-3


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_adamw_decays_what_the_official_pretraining_decays(decay_tokens):
    """Official main_pretrain.py (timm 0.3.2 add_weight_decay, no skip list): every trainable param but 1-D ones
    and biases is decayed, cls_token and mask_token included; decay_tokens=False also exempts the tokens."""
    model = maelab.create_model("mae_vit_pico_patch4_32", **TINY_MODEL_ARGS)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.05, **({} if decay_tokens else {"decay_tokens": False}))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95)
    decay_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            decay_of[id(p)] = group["weight_decay"]
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert {id(names[n]) for n in trainable} == set(decay_of), "every trainable param is optimized exactly once"
    assert "encoder.pos_embed" not in trainable and "decoder_pos_embed" not in trainable  # fixed sin-cos
    tokens = ("encoder.cls_token", "mask_token")
    for n in trainable:
        p = names[n]
        no_decay = p.ndim <= 1 or n.endswith(".bias") or (n in tokens and not decay_tokens)
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), n
    assert [decay_of[id(names[n])] for n in tokens] == [0.05 if decay_tokens else 0.0] * 2
    assert decay_of[id(names["encoder.blocks.0.attn.qkv.weight"])] == 0.05
    assert decay_of[id(names["encoder.blocks.0.norm1.weight"])] == 0.0


def test_set_lr_honours_lr_scale():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_scale": 0.5}], lr=1.0)
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
