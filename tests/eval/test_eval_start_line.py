"""Evaluation commands as a user runs them: a shortened run is not stopped by the recipe's warmup, and each
command starts with one line stating the batch (per process x accumulation x processes, the accumulation only
where it exists: the training protocols, fine-tuning and the linear probe, not kNN or embed) and the peak lr."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.conftest import save_random_mae

from maelab.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 1,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}
SMALL_DATA = ["data.num_samples=32", "data.num_classes=4", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_random_mae(tmp_path_factory.mktemp("ckpt") / "mae.pt", **TINY)


def _warmup_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "warmup_epochs" in r.getMessage()
    ]


def _start_line(caplog, prefix: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    assert len(lines) == 1, lines
    return lines[0]


def test_finetune_with_fewer_epochs_than_the_default_warmup_runs_and_warns_once(ckpt, tmp_path, caplog):
    """`maelab finetune --epochs 2` (default warmup 5 epochs): warmup becomes 2, one warning, the run finishes."""
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--checkpoint",
        str(ckpt),
        "--data",
        "synthetic",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--output",
        str(out),
        "auto_augment=null",
        "reprob=0",
        *SMALL_DATA,
    ]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert _warmup_warnings(caplog) == [
        "warmup_epochs=5 is longer than the run (epochs=2): warming up over all 2 epochs instead"
    ]
    assert (out / "eval.json").is_file()
    assert "warmup_epochs: 2.0" in (out / "config.yaml").read_text()  # what was used is recorded
    # 32 images / 16 = 2 steps an epoch; lr = base_lr 1e-3 x 16 / 256
    line = _start_line(caplog, "fine-tuning ")
    assert "batch 16 x 1 accum x 1 procs = 16, peak lr 6.25e-05, 2 epochs (2 warmup) = 4 steps" in line, line


def test_linprobe_recipe_with_fewer_epochs_than_its_warmup_runs_and_warns_once(ckpt, tmp_path, caplog):
    """The shipped synthetic recipe (warmup 5) with `--epochs 2`."""
    out = tmp_path / "lp"
    argv = [
        "linprobe",
        "--config",
        str(RECIPES / "linprobe_synthetic_tiny.yaml"),
        "--checkpoint",
        str(ckpt),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--output",
        str(out),
        *SMALL_DATA,
    ]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert _warmup_warnings(caplog) == [
        "warmup_epochs=5 is longer than the run (epochs=2): warming up over all 2 epochs instead"
    ]
    assert (out / "eval.json").is_file()
    line = _start_line(caplog, "linear probe ")
    assert "; batch 32 x 1 accum x 1 procs = 32, peak lr 1.25, 2 epochs (2 warmup) = 2 steps" in line, line


def test_linprobe_states_the_batch_derived_from_global_batch(ckpt, tmp_path, caplog, monkeypatch):
    """global_batch=32 in a job of WORLD_SIZE processes: the config takes 32 / WORLD_SIZE per process (in
    accum_steps micro-batches of at most batch_size), and the start line shows it (one process here: the
    derivation is a function of the environment)."""
    out = tmp_path / "lp"
    argv = [
        "linprobe",
        "--config",
        str(RECIPES / "linprobe_synthetic_tiny.yaml"),
        "--checkpoint",
        str(ckpt),
        "--epochs",
        "1",
        "warmup_epochs=0",
        "global_batch=32",
        "--output",
        str(out),
        *SMALL_DATA,
    ]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "; batch 32 x 1 accum x 1 procs = 32, peak lr 1.25" in _start_line(caplog, "linear probe ")
    saved = (out / "config.yaml").read_text()
    assert "batch_size: 32\n" in saved and "accum_steps: 1\n" in saved


def test_knn_states_its_feature_batch(ckpt, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert (
            main(
                [
                    "knn",
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    "synthetic",
                    "--batch-size",
                    "32",
                    "--output",
                    str(tmp_path / "knn"),
                    *SMALL_DATA,
                ]
            )
            == 0
        )
    line = _start_line(caplog, "kNN (k=20")
    assert "feature extraction batch 32 x 1 procs = 32, " in line and "32 train / " in line, line
    assert "accum" not in line, line


def test_embed_states_its_batch_without_accumulation(ckpt, tmp_path, caplog):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 40, 200)).save(tmp_path / "imgs" / f"{i}.png")
    with caplog.at_level(logging.INFO):
        assert (
            main(
                [
                    "embed",
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    str(tmp_path / "imgs"),
                    "--batch-size",
                    "32",
                    "--output",
                    str(tmp_path / "f.npy"),
                    "--num-workers",
                    "0",
                    "--no-progress",
                ]
            )
            == 0
        )
    line = _start_line(caplog, "embed (")
    assert "(2 images, unlabeled); batch 32 x 1 procs = 32, " in line and "accum" not in line, line
