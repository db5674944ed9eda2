"""``maelab finetune | linprobe | knn`` under torchrun (2 gloo processes on CPU) == 1 process.

Two processes with per-process batch ``b`` must compute what one process computes with the
global batch ``2 b``: the same samples per step (interleaved sampler slices), the same
per-sample augmentation (seeded by (seed, epoch, index)), gradients averaged by DDP, the
linear probe's BatchNorm on global-batch statistics, and evaluation in disjoint shards whose
counts are summed. Randomness that depends on how a batch is split (Mixup pairing, drop
path; each rank draws them from its own seed, as the official ``seed + rank``) is switched
off, so the trained weights can be compared at fp32 tolerance. The test
split has an odd size (33 images): a padded shard would count an image twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import assert_weights_close, save_random_mae

from maelab import cli

TINY = {
    "img_size": 16,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 1,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}
NUM_TEST = 33  # data.num_samples=132 -> 132 training and 33 test images; 4 global batches of 32 per epoch


def synth() -> list[str]:
    return [
        "--data",
        "synthetic",
        "data.num_samples=132",
        "data.num_classes=4",
        "--num-workers",
        "0",
        "data.crop_pct=1.0",
        "--no-progress",
    ]


def run_one(argv: list[str]) -> int:
    """One process, in this interpreter, through the real entry point ``maelab.cli.main``."""
    return cli.main(argv)


def run_two(argv: list[str], summary: str = "eval.json in") -> subprocess.CompletedProcess:
    """Two gloo processes: ``torchrun --standalone --nproc_per_node 2 -m maelab ...``; ``summary`` is a
    part of the command's one-line summary, which only rank 0 prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "maelab",
        *argv,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(summary) == 1, proc.stdout  # only rank 0 reports
    return proc


def read_eval(out: Path) -> dict:
    # exactly one eval.json (no per-rank copies, nothing half-written left behind)
    assert sorted(p.name for p in out.rglob("*eval*.json*")) == ["eval.json"]
    return json.loads((out / "eval.json").read_text())


def epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def assert_same_metrics(one: dict, two: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        # counts over disjoint shards: a whole number of the 33 test images, not of a padded 34
        assert abs(two[key] * NUM_TEST / 100 - round(two[key] * NUM_TEST / 100)) < 1e-6, (key, two[key])
        assert two[key] == pytest.approx(one[key], abs=100 / NUM_TEST + 1e-9), key  # at most one image apart
    for key in ("val_loss", "ema_val_loss"):
        if key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random-init tiny MAE checkpoint (its features separate the synthetic shapes somewhat)."""
    return save_random_mae(tmp_path_factory.mktemp("ckpt") / "mae.pt", **TINY)


# ---------------------------------------------------------------------------------- fine-tuning
FINETUNE = ["warmup_epochs=1", "--lr", "1e-3", "mixup=0", "cutmix=0", "--drop-path", "0", "--ema", "ema_decay=0.9"]
"""The paper's augmentation (RandAugment, random erasing) stays on: it is seeded per sample."""


@pytest.mark.slow  # 10 s of torchrun; default: tests/engine/test_distributed.py (2 ranks == 1 on the same loop)
def test_finetune_two_processes_match_one(ckpt, tmp_path):
    common = ["finetune", "--checkpoint", str(ckpt), "--epochs", "2", *FINETUNE, *synth()]
    assert run_one([*common, "--output", str(tmp_path / "one"), "--batch-size", "32"]) == 0
    run_two([*common, "--output", str(tmp_path / "two"), "--batch-size", "16"])
    one, two = read_eval(tmp_path / "one"), read_eval(tmp_path / "two")
    assert two["config"]["batch_size"] == 16 and two["world_size"] == 2
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 8
    assert_same_metrics(one["metrics"], two["metrics"], ("top1", "ema_top1", "best_top1"))
    assert epochs_logged(tmp_path / "two") == [1, 2]
    a, b = last_state(tmp_path / "one"), last_state(tmp_path / "two")
    assert_weights_close(a["model"], b["model"])
    assert_weights_close(a["ema"], b["ema"])  # the EMA is kept on every rank
    assert (tmp_path / "two" / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow  # 12 s; default suite: tests/eval/test_finetune_resume.py
def test_finetune_resumes_on_two_processes(ckpt, tmp_path):
    """A 1-process checkpoint continues on 2 ranks (each loads it) exactly as on 1 process."""
    common = ["finetune", "--checkpoint", str(ckpt), *FINETUNE, *synth()]
    one = tmp_path / "one"
    assert run_one([*common, "--output", str(one), "--batch-size", "32", "--epochs", "1"]) == 0
    shutil.copytree(one, tmp_path / "two")
    assert run_one([*common, "--output", str(one), "--batch-size", "32", "--epochs", "2", "--resume"]) == 0
    run_two([*common, "--output", str(tmp_path / "two"), "--batch-size", "16", "--epochs", "2", "--resume"])
    assert epochs_logged(tmp_path / "two") == [1, 2]
    a, b = last_state(one), last_state(tmp_path / "two")
    assert b["epoch"] == 2 and b["world_size"] == 2
    assert_weights_close(a["model"], b["model"])
    assert_same_metrics(read_eval(one)["metrics"], read_eval(tmp_path / "two")["metrics"], ("top1", "ema_top1"))


@pytest.mark.slow  # 11 s each; default suite: test_finetune_two_processes_match_one
# ---------------------------------------------------------------------------------- linear probe
@pytest.mark.parametrize("train_blocks", [0, 1], ids=["head", "last_block"])
def test_linprobe_streaming_two_processes_match_one(ckpt, tmp_path, train_blocks):
    """Streaming with augmentation: DDP over the head (or the whole probe with a tuned block)."""
    common = [
        "linprobe",
        "--checkpoint",
        str(ckpt),
        "--epochs",
        "2",
        "warmup_epochs=1",
        "--optimizer",
        "lars",
        "--base-lr",
        "0.4",
        "--train-blocks",
        str(train_blocks),
        *synth(),
    ]
    assert run_one([*common, "--output", str(tmp_path / "one"), "--batch-size", "32"]) == 0
    run_two([*common, "--output", str(tmp_path / "two"), "--batch-size", "16"])
    one, two = read_eval(tmp_path / "one"), read_eval(tmp_path / "two")
    assert two["cached_features"] is False and two["config"]["augment"] is True
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 8
    assert_same_metrics(one["metrics"], two["metrics"], ("top1", "best_top1"))
    a, b = last_state(tmp_path / "one")["model"], last_state(tmp_path / "two")["model"]
    assert any(k.startswith("encoder.blocks.1.") for k in a) == (train_blocks > 0)
    assert_weights_close(a, b)  # the head (BatchNorm running statistics included) and any tuned block


@pytest.mark.slow  # 10 s; default suite: test_finetune_two_processes_match_one
def test_linprobe_cached_two_processes_match_one(ckpt, tmp_path):
    """The cache path: sharded extraction, all-gathered; every rank trains the head on the global batches."""
    common = ["linprobe", "--checkpoint", str(ckpt), "--epochs", "2", "warmup_epochs=1", "--no-augment", *synth()]
    assert run_one([*common, "--output", str(tmp_path / "one"), "--batch-size", "32"]) == 0
    run_two([*common, "--output", str(tmp_path / "two"), "--batch-size", "16"])
    one, two = read_eval(tmp_path / "one"), read_eval(tmp_path / "two")
    assert two["cached_features"] is True
    assert_same_metrics(one["metrics"], two["metrics"], ("top1",))
    assert_weights_close(last_state(tmp_path / "one")["model"], last_state(tmp_path / "two")["model"])


@pytest.mark.slow  # 9 s; default suite: test_embed_two_processes_write_the_one_process_output_once (same extraction)
# ---------------------------------------------------------------------------------- kNN
def test_knn_two_processes_match_one(ckpt, tmp_path):
    common = ["knn", "--checkpoint", str(ckpt), "--batch-size", "32", *synth()]
    assert run_one([*common, "--output", str(tmp_path / "one")]) == 0
    proc = run_two([*common, "--output", str(tmp_path / "two")])
    one, two = read_eval(tmp_path / "one"), read_eval(tmp_path / "two")
    assert two["num_test"] == NUM_TEST and two["world_size"] == 2
    assert two["metrics"]["top1"] == one["metrics"]["top1"], (one["metrics"], two["metrics"])
    assert f"top-1 {one['metrics']['top1']:.2f}" in proc.stdout
