"""DataLoader workers leave SIGTERM/SIGUSR1/SIGINT to the main process; their parent can still end them."""

import multiprocessing
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from maelab.data.loader import ResumableSampler, build_loader
from maelab.engine.signals import STOP_SIGNALS

SRC = Path(__file__).resolve().parents[2] / "src" / "maelab"


def _ended(pid: int, timeout: float = 60) -> bool:
    """Whether process ``pid`` (a child of this one) ended within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(") ")[1].startswith(("Z", "X")):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("context", [None, "forkserver"])  # forkserver: Python 3.14's default start method
def test_a_worker_ignores_stop_signals_from_others_and_ends_on_its_parents_sigterm(context, request):
    if context is not None:  # a Python whose default start method is not fork: maelab's loaders still fork
        old = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method(context, force=True)
        request.addfinalizer(lambda: multiprocessing.set_start_method(old, force=True))
    loader = build_loader(TensorDataset(torch.arange(64.0)), 4, ResumableSampler(64, seed=0), num_workers=1)
    it = iter(loader)
    next(it)
    pid = it._workers[0].pid
    for sig in STOP_SIGNALS:  # sent by another process (`kill`), as a scheduler signals the whole process group
        subprocess.run(["kill", f"-{sig.name.removeprefix('SIG')}", str(pid)], check=True)
    assert len(list(it)) == 64 // 4 - 1  # the epoch ends normally (a killed worker raises here)
    assert not _ended(pid, timeout=0.2)  # persistent: it waits for the next epoch
    os.kill(pid, signal.SIGTERM)  # from its parent: how torch and multiprocessing end workers at exit
    assert _ended(pid)


def test_every_dataloader_maelab_builds_is_signal_safe():
    raw = [
        f"{p.relative_to(SRC)}:{i + 1}"
        for p in sorted(SRC.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines())
        if re.search(r"(?<!\w)DataLoader\(", line)
    ]
    assert raw == [], f"DataLoader built without SignalSafeDataLoader at {raw}"
