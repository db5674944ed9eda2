"""Crash and preemption: SIGKILL at random moments, SIGTERM/SIGUSR1/Ctrl-C to the main process or the whole
process group, then --resume, change nothing."""

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
from tests.engine import signal_child

ARGS = [
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--no-progress",
    "data.num_samples=64",
    "lr=0.002",
    "deterministic=true",
    *[f"model_args.{k}={v}" for k, v in TINY_MODEL_ARGS.items()],
]


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
    rng = random.Random(1)
    kills = 0
    for attempt in range(2):
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


HOLD_STEP = 5  # the signal arrives in step 5 of 24 (epoch 1 of 3): mid-run, mid-epoch
# the default suite keeps Ctrl-C to the group (saved, resumed exactly); SIGTERM and SIGUSR1 take the same handler
# (StopFlag), and SIGTERM to a group also runs in tests/engine/test_distributed.py (torchrun-group)
SLOW = pytest.mark.slow
CASES = [
    pytest.param(signal.SIGTERM, "group", id="sigterm-group", marks=SLOW),
    pytest.param(signal.SIGUSR1, "group", id="sigusr1-group", marks=SLOW),
    pytest.param(signal.SIGINT, "group", id="ctrl_c"),
    pytest.param(signal.SIGTERM, "main", id="sigterm-main", marks=SLOW),
    pytest.param(signal.SIGUSR1, "main", id="sigusr1-main", marks=SLOW),
]


@pytest.mark.parametrize("sig,to", CASES)
def test_signal_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, ref, sig, to):
    # "group": every process of the job, a DataLoader worker included (SLURM, timeout, Ctrl-C in a terminal)
    out = tmp_path / "stopped"
    proc, ready = signal_child.start(out, HOLD_STEP, [*ARGS, "--num-workers", "1"])
    pid = signal_child.wait_ready(proc, ready, [0])[0]
    if to == "group":
        os.killpg(proc.pid, sig)
    else:
        os.kill(pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"received signal {sig.value}: stopped after step {HOLD_STEP}" in stderr and "stopped" in stdout
    assert stderr.count("Ctrl-C: saving") == (sig == signal.SIGINT)  # once, not once per process
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"] == HOLD_STEP  # < 24: mid-run
    if to == "group":  # the same checkpoint in every case: resumed three times with -m slow, once by default
        subprocess.run(_cmd(out, "--resume"), check=True, capture_output=True, timeout=300)
        _assert_same(_weights(ref), _weights(out))
