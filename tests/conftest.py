"""Shared fixtures and helpers: tiny model arguments, the optional real CIFAR-10 copy, a random MAE checkpoint,
the one-line user error of a command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from maelab.models.mae import MaskedAutoencoder

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = (REPO.parent / "shared" / "data" / "cifar10").resolve()

# A model small enough for end-to-end CPU tests (about 0.2M parameters).
TINY_MODEL_ARGS = dict(embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


# CI sets MAELAB_REQUIRE_OPTIONAL=1 (.ci/run): there a test skipped because an extra of '.[test]' is missing
# (the Hugging Face equivalence tests need transformers, the fp8 tests torchao, the shard tests webdataset and
# datasets) fails the run instead of passing silently. Local runs without the extras keep skipping them.
REQUIRE_OPTIONAL = os.environ.get("MAELAB_REQUIRE_OPTIONAL") == "1"
OPTIONAL_EXTRAS = ("transformers", "torchao", "'webdataset'", "'datasets'")  # quoted as importorskip names them
_skipped_for_extras: list[str] = []


def _note_skip_for_extra(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Remember a skip whose reason names one of OPTIONAL_EXTRAS (importorskip or a skipif reason)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(name in reason for name in OPTIONAL_EXTRAS):
            _skipped_for_extras.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip_for_extra(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip_for_extra(report)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if REQUIRE_OPTIONAL and _skipped_for_extras:
        terminalreporter.section("MAELAB_REQUIRE_OPTIONAL=1: skipped for a missing extra (this fails the run)")
        for line in _skipped_for_extras:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if (
        REQUIRE_OPTIONAL
        and _skipped_for_extras
        and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
        torch.testing.assert_close(
            without_key_bias(k, a[k].float()), without_key_bias(k, b[k].float()), rtol=rtol, atol=atol, msg=k
        )


def without_key_bias(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x``, less the key third of a fused qkv bias (``*attn.qkv.bias``; see :func:`assert_weights_close`)."""
    if not name.endswith("attn.qkv.bias"):
        return x
    width = x.shape[0] // 3
    return torch.cat([x[:width], x[2 * width :]])


def load_script(name: str):
    """The module of ``scripts/<name>.py`` (scripts are not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_mae(**model_args) -> MaskedAutoencoder:
    """A randomly initialized (seed 0) ``mae_vit_pico_patch4_32`` with ``model_args``."""
    import maelab

    torch.manual_seed(0)
    return maelab.create_model("mae_vit_pico_patch4_32", **model_args)


def save_mae(mae: MaskedAutoencoder, path: Path) -> Path:
    """``mae`` saved at ``path`` as a maelab checkpoint (weights, model config, step 0), the input evaluation
    commands take."""
    from maelab.config import to_dict
    from maelab.engine.checkpoint import atomic_save

    return atomic_save({"model": mae.state_dict(), "model_config": to_dict(mae.cfg), "step": 0}, path)


def save_random_mae(path: Path, **model_args) -> Path:
    """:func:`random_mae` saved at ``path`` by :func:`save_mae`."""
    return save_mae(random_mae(**model_args), path)


LOG_RECORD = ("DEBUG ", "INFO ", "WARNING ")  # the CLI's log format: "%(levelname)s %(name)s: %(message)s"


def one_error_line(stderr: str, log_records: bool = False) -> str:
    """The user error a command left on ``stderr``: one line ``maelab: error: ...``, the last and the only line
    (``log_records``: a real process's log records may come before it). Returns that line."""
    lines = stderr.rstrip().splitlines()
    others = [line for line in lines[:-1] if not (log_records and line.startswith(LOG_RECORD))]
    assert lines and lines[-1].startswith("maelab: error: ") and not others, stderr
    return lines[-1]


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``maelab argv`` in this interpreter (``maelab.cli.main``) as a user mistake: exit code 2 and
    :func:`one_error_line` on stderr. Returns that line."""
    from maelab.cli import main

    capsys.readouterr()  # only this command's output
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return one_error_line(err)
