"""A fine-tune stopped after its first epoch and resumed gives bit-identical weights to an
uninterrupted run, with the randomness of the paper recipe on: Mixup/CutMix (numpy's global RNG),
drop path (torch's), RandAugment and random erasing (seeded per sample)."""

from __future__ import annotations

import importlib

import pytest
import torch
from tests.conftest import save_random_mae

from maelab.config import DataConfig
from maelab.engine.checkpoint import LAST
from maelab.eval.config import FinetuneConfig
from maelab.eval.finetune import Finetuner

finetune_mod = importlib.import_module("maelab.eval.finetune")  # maelab.eval.finetune is also a function

TINY = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 1,
    "decoder_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}


class Stop(Exception):
    """Raised by the stop hook right after the first epoch's ``last.pt`` is written."""


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_random_mae(tmp_path_factory.mktemp("ckpt") / "mae.pt", **TINY)


def config(encoder, output) -> FinetuneConfig:
    """The paper recipe's randomness (mixup 0.8, cutmix 1.0, drop path 0.1, RandAugment, random erasing), 2 epochs."""
    data = DataConfig(name="synthetic", num_samples=64, num_classes=4, num_workers=0, crop_pct=1.0)
    cfg = FinetuneConfig(
        checkpoint=str(encoder), data=data, output=str(output), epochs=2, batch_size=16, warmup_epochs=0, ema=True
    )
    assert cfg.mixup > 0 and cfg.cutmix > 0 and cfg.drop_path > 0 and cfg.auto_augment and cfg.reprob > 0
    return cfg


def test_resumed_finetune_gives_bit_identical_weights(encoder, tmp_path, monkeypatch):
    full = config(encoder, tmp_path / "full")
    Finetuner(full, progress=False).run()

    part = config(encoder, tmp_path / "part")
    real_save = finetune_mod.atomic_save

    def save_then_stop(obj, path, *args, **kwargs):
        out = real_save(obj, path, *args, **kwargs)
        if path.name == LAST:
            raise Stop
        return out

    monkeypatch.setattr(finetune_mod, "atomic_save", save_then_stop)
    with pytest.raises(Stop):
        Finetuner(part, progress=False).run()
    monkeypatch.setattr(finetune_mod, "atomic_save", real_save)
    assert torch.load(tmp_path / "part" / "checkpoints" / LAST, weights_only=False)["epoch"] == 1
    Finetuner(part, resume=True, progress=False).run()

    a = torch.load(tmp_path / "full" / "checkpoints" / LAST, weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoints" / LAST, weights_only=False)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
