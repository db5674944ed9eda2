"""User-facing failures through the real entry point: one line ``maelab: error: ...`` on stderr, exit code 2.

Also when the failure happens in a DataLoader worker process (every loader: the per-sample CPU
DataLoader, the GPU-resident builder, the JPEG-decode loader, feature extraction of the
evaluation commands), on a full disk while saving, and on an out-of-memory training step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tests.conftest import TINY_MODEL_ARGS, error_line, one_error_line, save_random_mae
from tests.test_io import TOO_LARGE, file_size_limit

from maelab.cli import main
from maelab.data.images import load_image
from maelab.engine.checkpoint import LAST
from maelab.errors import DataError

TINY = [f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()]
QUIET = ["--no-progress", "--batch-size", "8"]
WORKERS = ["--num-workers", "2", "--strict-data"]


def one_epoch(command: str) -> list[str]:
    """``--epochs 1`` for the commands that train (kNN and embed have no epochs)."""
    return [] if command in ("knn", "embed") else ["--epochs", "1"]


def direct_error(path: Path) -> str:
    """The message of reading ``path`` in this process (no worker): what the user must see from a worker too."""
    with pytest.raises(DataError) as e:
        load_image(path)
    return str(e.value)


def labeled_folder(root: Path, suffix: str) -> Path:
    """``root/train/{a,b}`` (8 images each, one of them truncated) and ``root/val/{a,b}``; returns the bad file."""
    for split in ("train", "val"):
        for c, cls in enumerate("ab"):
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (32, 32), (30 * i, 120 * c, 90)).save(root / split / cls / f"{i}{suffix}")
    bad = root / "train" / "a" / f"3{suffix}"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pngs")
    return root, labeled_folder(root, ".png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_random_mae(tmp_path_factory.mktemp("ckpt") / "mae.pt", **TINY_MODEL_ARGS)


# ------------------------------------------------------------------ errors raised in loader workers
@pytest.mark.parametrize(
    "loader",
    [
        [],
        pytest.param(["data.gpu_resident=on"], marks=pytest.mark.slow),
        pytest.param(["data.decode=gpu"], marks=pytest.mark.slow),
    ],  # 10 s each
    ids=["dataloader", "gpu-resident-builder", "jpeg-decode"],
)
def test_worker_error_is_one_line_in_pretrain(tmp_path, capsys, loader):
    """--strict-data with 2 workers: a truncated image ends the run with the same line as without workers."""
    suffix = ".jpg" if "data.decode=gpu" in loader else ".png"
    bad = labeled_folder(tmp_path / "data", suffix)
    err = error_line(
        capsys,
        [
            "pretrain",
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "run"),
            *QUIET,
            *one_epoch("pretrain"),
            *WORKERS,
            *loader,
            *TINY,
        ],
    )
    assert err == f"maelab: error: {direct_error(bad)}"


# torch needs ~10 s to shut down a loader whose worker raised (its 2 workers do not take the stop sentinel and are
# terminated after two 5 s joins), so these are slow; the default suite shows the same mechanism (errors.
# original_message in the one CLI error printer) with the pre-training loaders and a real process.
@pytest.mark.parametrize(
    "command",
    [
        pytest.param("knn", marks=pytest.mark.slow),
        pytest.param("linprobe", marks=pytest.mark.slow),
        pytest.param("embed", marks=pytest.mark.slow),
    ],
)
def test_worker_error_is_one_line_in_evaluation(tmp_path, capsys, pngs, checkpoint, command):
    root, bad = pngs
    output = tmp_path / ("features.safetensors" if command == "embed" else "out")
    err = error_line(
        capsys,
        [
            command,
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(root),
            "--output",
            str(output),
            *QUIET,
            *one_epoch(command),
            *WORKERS,
        ],
    )
    assert err == f"maelab: error: {direct_error(bad)}"


@pytest.mark.slow  # 7 s (a real process); default suite: the in-process worker-error tests above, same printer
def test_worker_error_in_a_real_process_is_one_error_line(tmp_path, pngs):
    """The whole stderr of ``python -m maelab`` (log lines aside): no traceback, the error line last; the
    process ends (its workers too) within the timeout."""
    root, bad = pngs
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "maelab",
            "pretrain",
            "--data",
            str(root),
            "--output",
            str(tmp_path / "run"),
            *QUIET,
            *one_epoch("pretrain"),
            *WORKERS,
            *TINY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr, log_records=True) == f"maelab: error: {direct_error(bad)}"


# ------------------------------------------------------------------ other user-facing failures
@pytest.mark.slow  # 11 s end to end; default suite: tests/test_io.py and test_checkpoint's real failed writes
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys):
    """A write that really fails partway while saving (a file-size limit below the checkpoint's size, as a full disk):
    one line saying the previous last.pt is intact; it is, byte for byte; no temp file."""
    run = tmp_path / "run"
    argv = [
        "pretrain",
        "--output",
        str(run),
        "--no-progress",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "data.num_samples=16",
        *TINY,
    ]
    assert main([*argv, "--epochs", "1"]) == 0
    last = run / "checkpoints" / LAST
    before = last.read_bytes()

    # half the checkpoint: above the run's other files (config, metrics, figures); the write stops inside a tensor
    # record, where torch.save raises a RuntimeError ("unexpected pos"), not the OSError behind it
    with file_size_limit(len(before) // 2):
        err = error_line(capsys, [*argv, "--epochs", "2", "--resume"])
    assert err == f"maelab: error: cannot write checkpoint {last} ({TOO_LARGE}); the previous {LAST} is intact"
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=False)["epoch"] == 1
    assert not [p.name for p in last.parent.iterdir() if ".tmp" in p.name]


def _backward_out_of_memory(*args: object, **kwargs: object) -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize(
    ("command", "extra", "advice"),
    [
        (
            "pretrain",
            [],
            "lower --batch-size and raise accum_steps by the same factor to keep the batch per optimizer "
            "step, e.g. --batch-size 4 --accum-steps 2",
        ),
        pytest.param(  # 10 s in the full suite; default: linprobe-global-batch (the same advice)
            "pretrain",
            ["global_batch=16"],
            "lower --batch-size, e.g. --batch-size 4: global_batch=16 then takes more "
            "accumulation steps (now accum_steps=2)",
            marks=pytest.mark.slow,
        ),
        ("finetune", ["--accum-steps", "2"], "e.g. --batch-size 4 --accum-steps 4"),
        # the linear probe accumulates like the other training protocols (accum_steps, derived from global_batch)
        ("linprobe", [], "e.g. --batch-size 4 --accum-steps 2"),
        ("linprobe", ["global_batch=8"], "lower --batch-size, e.g. --batch-size 4: global_batch=8 then takes more"),
    ],
    ids=["pretrain", "pretrain-global-batch", "finetune", "linprobe", "linprobe-global-batch"],
)
def test_out_of_memory_names_the_batch_size_and_what_to_change(
    tmp_path, capsys, monkeypatch, checkpoint, command, extra, advice
):
    """An out-of-memory training step (raised here from backward) -> one line with the per-process batch size."""
    source = [] if command == "pretrain" else ["--checkpoint", str(checkpoint)]
    monkeypatch.setattr(torch.Tensor, "backward", _backward_out_of_memory)
    err = error_line(
        capsys,
        [
            command,
            *source,
            "--data",
            "synthetic",
            "data.num_samples=16",
            "--num-workers",
            "0",
            "--output",
            str(tmp_path / "out"),
            *QUIET,
            *one_epoch(command),
            *extra,
            *(TINY if command == "pretrain" else []),
        ],
    )
    assert "out of memory on cpu in a training step at batch_size=8 per process" in err
    assert advice in err


@pytest.mark.parametrize("command", ["knn", "linprobe", "finetune", "visualize", "export"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, checkpoint, command):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(checkpoint.read_bytes()[:3000])
    extra = {"visualize": ["--images", str(tmp_path)], "export": ["--output", str(tmp_path / "e.safetensors")]}
    err = error_line(capsys, [command, "--checkpoint", str(bad), *extra.get(command, ["--data", "synthetic"])])
    assert err.startswith(f"maelab: error: {bad}: corrupt or unreadable checkpoint (RuntimeError: ")
    assert ". " not in err  # the reason's first sentence only, not torch's paragraph of advice


@pytest.mark.parametrize("command", ["pretrain", "knn"])
def test_missing_data_path_is_one_line_naming_it(tmp_path, capsys, checkpoint, command):
    missing = tmp_path / "no" / "such" / "folder"
    source = [] if command == "pretrain" else ["--checkpoint", str(checkpoint)]
    err = error_line(
        capsys,
        [command, *source, "--data", str(missing), "--output", str(tmp_path / "out"), *QUIET, *one_epoch(command)],
    )
    assert f"'{missing}'" in err


def test_invalid_yaml_recipe_names_file_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\nbatch_size: 8\n  lr: 0.1\n")
    err = error_line(capsys, ["pretrain", "--config", str(recipe)])
    assert err == f"maelab: error: {recipe}: invalid YAML at line 3, column 5: mapping values are not allowed here"
