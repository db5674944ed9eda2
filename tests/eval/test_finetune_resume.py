"""Stopped and resumed evaluation runs give bit-identical results to uninterrupted ones.

Fine-tuning runs with the randomness of the paper recipe on: Mixup/CutMix (numpy's global RNG), drop path
(torch's), RandAugment and random erasing (seeded per sample). It is stopped either after its first epoch (an
epoch boundary) or in the middle of an epoch, as on SIGTERM (``Loop.run(max_steps=k)``: ``last.pt`` is written
after step ``k`` and the run stops), then continued with ``finetune(cfg, resume=True)``. The linear probe is
stopped in the middle of an epoch and continued with ``linprobe(cfg, resume=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import save_random_mae

import maelab.engine.loop as loop_mod
from maelab.config import DataConfig
from maelab.engine.checkpoint import LAST
from maelab.engine.loop import Loop, RunResult, start_run
from maelab.eval.config import FinetuneConfig, LinprobeConfig
from maelab.eval.finetune import Finetuning, finetune
from maelab.eval.linprobe import LinearProbing, linprobe

TINY = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 1,
    "decoder_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}
STEPS_PER_EPOCH = 4  # 64 training images, batch 16


class Stop(Exception):
    """Raised by the stop hook right after the first epoch's ``last.pt`` is written."""


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return save_random_mae(tmp_path_factory.mktemp("ckpt") / "mae.pt", **TINY)


def config(encoder: Path, output: Path, **kw: Any) -> FinetuneConfig:
    """The paper recipe's randomness (mixup 0.8, cutmix 1.0, drop path 0.1, RandAugment, random erasing), 2 epochs."""
    data = DataConfig(name="synthetic", num_samples=64, num_classes=4, num_workers=0, crop_pct=1.0)
    cfg = FinetuneConfig(
        checkpoint=str(encoder),
        data=data,
        output=str(output),
        epochs=2,
        batch_size=16,
        warmup_epochs=0,
        ema=True,
        **kw,
    )
    assert cfg.mixup > 0 and cfg.cutmix > 0 and cfg.drop_path > 0 and cfg.auto_augment and cfg.reprob > 0
    return cfg


def last_state(out: Path) -> dict[str, Any]:
    return torch.load(out / "checkpoints" / LAST, weights_only=False)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested checkpoint entries (state dicts, optimizer states) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        assert_identical(a[key], b[key], key)


@pytest.fixture(scope="module")
def uninterrupted(encoder, tmp_path_factory) -> Callable[[int | None], tuple[RunResult, dict[str, Any]]]:
    """Uninterrupted fine-tunes by ``train_blocks`` (each run on first use): ``(result, last.pt)``."""
    runs: dict[Any, tuple[RunResult, dict[str, Any]]] = {}

    def get(train_blocks: int | None) -> tuple[RunResult, dict[str, Any]]:
        if train_blocks not in runs:
            out = tmp_path_factory.mktemp(f"full_{train_blocks}")
            result = finetune(config(encoder, out, train_blocks=train_blocks), progress=False)
            runs[train_blocks] = (result, last_state(out))
        return runs[train_blocks]

    return get


def test_finetune_resumed_at_an_epoch_boundary_gives_bit_identical_weights(
    encoder, uninterrupted, tmp_path, monkeypatch
):
    _, full = uninterrupted(None)
    cfg = config(encoder, tmp_path / "part")
    real_save = loop_mod.atomic_save

    def save_then_stop(obj, path, *args, **kwargs):
        out = real_save(obj, path, *args, **kwargs)
        if path.name == LAST:
            raise Stop
        return out

    monkeypatch.setattr(loop_mod, "atomic_save", save_then_stop)
    with pytest.raises(Stop):
        finetune(cfg, progress=False)
    monkeypatch.setattr(loop_mod, "atomic_save", real_save)
    saved = last_state(tmp_path / "part")
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 0)
    finetune(cfg, resume=True, progress=False)

    part = last_state(tmp_path / "part")
    assert full["step"] == part["step"] == 2 * STEPS_PER_EPOCH
    assert_same_weights(full, part, ("model", "ema"))


@pytest.mark.parametrize(
    "max_steps, train_blocks",
    [(2, None), (STEPS_PER_EPOCH + 2, None), (STEPS_PER_EPOCH + 2, 0)],
    ids=["mid_first_epoch", "mid_second_epoch", "mid_epoch_partial"],
)
def test_finetune_preempted_mid_epoch_resumes_bit_identically(
    encoder, uninterrupted, tmp_path, max_steps, train_blocks
):
    """Stopped after step ``max_steps`` (as on SIGTERM: last.pt mid-epoch, no eval.json), then resumed through the
    shared loop: the sampler position, the RNG states (Mixup/CutMix, drop path), the optimizer, the EMA and the
    epoch's loss statistics continue exactly. ``train_blocks=0``: the frozen blocks (drop path 0.1 in the last)
    must stay in eval mode after a mid-epoch resume too."""
    full_result, full = uninterrupted(train_blocks)
    out = tmp_path / "part"
    cfg = config(encoder, out, train_blocks=train_blocks)
    stopped = Loop(Finetuning(start_run(cfg, "finetune", progress=False))).run(max_steps=max_steps)
    assert stopped.stopped_early and stopped.step == max_steps
    saved = last_state(out)
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (
        max_steps,
        max_steps // STEPS_PER_EPOCH,
        max_steps % STEPS_PER_EPOCH,
    )
    assert not (out / "eval.json").exists()

    resumed = finetune(cfg, resume=True, progress=False)
    assert resumed.step == full_result.step == 2 * STEPS_PER_EPOCH and not resumed.stopped_early
    assert_same_weights(full, last_state(out), ("model", "ema", "optimizer"))
    # the same evaluation, best epoch and loss statistics: the resumed run's record is the uninterrupted one's
    assert resumed.metrics == full_result.metrics
    assert resumed.final_loss == full_result.final_loss
    assert json.loads((out / "eval.json").read_text())["metrics"] == resumed.metrics
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


# ---------------------------------------------------------------------------------- linear probe
def probe_config(encoder: Path, output: Path, cache: bool) -> LinprobeConfig:
    """2 epochs of 4 steps; cached features (no augmentation) or streamed, augmented images."""
    data = DataConfig(name="synthetic", num_samples=64, num_classes=4, num_workers=0, crop_pct=1.0)
    return LinprobeConfig(
        checkpoint=str(encoder),
        data=data,
        output=str(output),
        augment=not cache,
        epochs=2,
        warmup_epochs=1,
        batch_size=16,
        seed=5,
    )


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streaming"])
def test_linprobe_preempted_mid_epoch_resumes_to_the_same_head(encoder, tmp_path, cache):
    full = linprobe(probe_config(encoder, tmp_path / "full", cache), progress=False)
    cfg = probe_config(encoder, tmp_path / "part", cache)
    loop = Loop(LinearProbing(start_run(cfg, "linprobe", overwrite=True, progress=False)))
    assert loop.p.cached is cache
    stopped = loop.run(max_steps=STEPS_PER_EPOCH + 1)
    assert stopped.stopped_early and last_state(tmp_path / "part")["batch_in_epoch"] == 1

    resumed = linprobe(cfg, resume=True, progress=False)
    assert resumed.step == full.step == 2 * STEPS_PER_EPOCH
    a, b = last_state(tmp_path / "full"), last_state(tmp_path / "part")
    assert set(a["model"]) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"} | {
        "head.1.weight",
        "head.1.bias",
    }
    assert_same_weights(a, b, ("model", "optimizer"))
    assert resumed.metrics == full.metrics
    assert json.loads((tmp_path / "part" / "eval.json").read_text())["cached_features"] is cache
