"""maelab.io, the one atomic writer, under real failed writes: a file-size limit (RLIMIT_FSIZE) makes the kernel
refuse a write partway with EFBIG, as a full disk does with ENOSPC."""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from maelab.errors import DataError, MaelabError
from maelab.io import atomic_write, write_failure

TOO_LARGE = os.strerror(27)  # EFBIG: "File too large"


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """In this block every write that would grow a file past ``limit`` bytes fails partway with EFBIG, as on a
    full disk (RLIMIT_FSIZE, with SIGXFSZ ignored so the process is not killed); both are restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_failing_partway_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, b"old" * 100)
    with file_size_limit(1000), pytest.raises(DataError) as e:
        atomic_write(path, b"new" * 1000, "the features", DataError)
    assert str(e.value) == f"cannot write the features {path} ({TOO_LARGE}); the previous out.bin is intact"
    assert path.read_bytes() == b"old" * 100
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_write_failing_partway_with_no_previous_file_says_nothing_was_saved(tmp_path):
    path = tmp_path / "sub" / "out.bin"

    def chunks(f) -> None:
        for _ in range(10):
            f.write(b"x" * 500)

    with file_size_limit(1000), pytest.raises(MaelabError) as e:
        atomic_write(path, chunks)
    assert str(e.value) == f"cannot write {path} ({TOO_LARGE}); nothing was saved"
    assert os.listdir(path.parent) == []


@pytest.mark.parametrize("bug", [RuntimeError("shape mismatch"), ValueError("bad value")])
def test_errors_that_are_not_failed_writes_pass_through_and_leave_no_temp_file(tmp_path, bug):
    def buggy(f) -> None:
        f.write(b"partial")
        raise bug

    with pytest.raises(type(bug)) as e:
        atomic_write(tmp_path / "out.bin", buggy)
    assert e.value is bug
    assert os.listdir(tmp_path) == []


def test_torchs_writer_failing_partway_is_a_failed_write_also_without_an_oserror(tmp_path):
    """torch.save to a path hits the limit in C++: a RuntimeError "unexpected pos ..." with no OSError behind it."""
    with file_size_limit(1000), pytest.raises(RuntimeError) as e:
        torch.save({"w": torch.zeros(10_000)}, tmp_path / "w.pt")
    assert write_failure(e.value) == f"the write stopped partway: {str(e.value).split('] . ')[1]}"
    assert write_failure(RuntimeError("size mismatch for blocks.0.attn.qkv.weight")) is None


def test_a_failed_write_behind_a_runtime_error_gives_its_reason(tmp_path):
    """torch.save to a file: the RuntimeError of its zip writer has the EFBIG OSError on __context__."""
    with file_size_limit(1000), pytest.raises(RuntimeError) as e, open(tmp_path / "w.pt", "wb") as f:
        torch.save({"w": torch.zeros(10_000)}, f)
    assert write_failure(e.value) == TOO_LARGE


def test_the_file_is_created_with_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path: Path = atomic_write(tmp_path / "out.txt", b"hello")
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"hello" and path.stat().st_mode & 0o777 == 0o644


def _encoder(path: Path, big: bool) -> object:
    from maelab import create_model
    from maelab.models.weights import export_encoder

    return export_encoder(create_model("mae_vit_pico_patch4_32", depth=2 if big else 1), path)


def _hf(path: Path, big: bool) -> object:
    from maelab import create_model
    from maelab.models.hf import save_hf

    return save_hf(create_model("mae_vit_pico_patch4_32", depth=2 if big else 1), path.parent)


def _embeddings(path: Path, big: bool) -> object:
    from maelab.eval.embed import write_embeddings

    n = 100 if big else 2
    return write_embeddings(path, torch.zeros(n, 16), None, [f"{i}.png" for i in range(n)], [], {})


def _curve(path: Path, big: bool) -> object:
    from maelab.viz.curves import save_loss_curve

    return save_loss_curve([{"epoch": e, "loss": 1.0 / e} for e in range(1, 30 if big else 2)], path)


def _json(path: Path, big: bool) -> object:
    from maelab.io import write_json

    return write_json({"x": list(range(1000 if big else 1))}, path)


def _records(path: Path, big: bool) -> object:
    from maelab.engine.metrics import write_records

    return write_records(path, [{"epoch": e, "loss": 0.5} for e in range(1, 200 if big else 2)])


@pytest.mark.parametrize(
    ("writer", "name", "what"),
    [
        (_encoder, "encoder.safetensors", "the encoder "),
        (_hf, "model.safetensors", "the Hugging Face weights "),
        (_embeddings, "feats.safetensors", ""),
        (_curve, "loss_curve.png", "the figure "),
        (_json, "eval.json", ""),
        (_records, "metrics.jsonl", ""),
    ],
    ids=["export_encoder", "export_hf", "embed", "figure", "eval-json", "metrics-jsonl"],
)
def test_every_writer_reports_a_failed_write_in_one_line_and_keeps_the_previous_file(tmp_path, writer, name, what):
    """The files besides checkpoints go through the same writer: a real failed write is one MaelabError line."""
    path = tmp_path / name
    writer(path, big=False)
    before = path.read_bytes()
    with file_size_limit(len(before) + 1), pytest.raises(MaelabError) as e:
        writer(path, big=True)
    assert str(e.value) == f"cannot write {what}{path} ({TOO_LARGE}); the previous {name} is intact"
    assert path.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"]
