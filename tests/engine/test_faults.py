"""Crash and preemption: SIGKILL at random moments and SIGTERM, then --resume, change nothing."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL_ARGS

ARGS = ["--epochs", "3", "--batch-size", "8", "--num-workers", "0", "--no-progress", "data.num_samples=64",
        "lr=0.002", "deterministic=true", *[f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()]]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "maelab", "pretrain", "--output", str(out), *ARGS, *extra]


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(path)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted-and-resumed run must end with."""
    out = tmp_path_factory.mktemp("faults") / "ref"
    subprocess.run(_cmd(out), check=True, capture_output=True, timeout=300)
    return out


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, ref):
    out = tmp_path / "killed"
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kills = 0
    for attempt in range(3):
        extra = ["save_every_steps=1"] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(_cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if _wait_for(out / "checkpoints" / "last.pt", proc):
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment: often inside a checkpoint write
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=300)
    final = subprocess.run(_cmd(out, "save_every_steps=1", "--resume"), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 1
    _assert_same(_weights(ref), _weights(out))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_signal_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, ref, sig):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(out / "config.yaml", proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    if state["epoch"] < 3:  # the signal arrived before the run ended
        assert "stopped" in stdout and "received signal" in stderr
    subprocess.run(_cmd(out, "--resume"), check=True, capture_output=True, timeout=300)
    _assert_same(_weights(ref), _weights(out))
