"""Generic benchmark helpers: step timing, FLOP counting, matmul peak (for MFU), memory, environment.

On CUDA, steps are timed with CUDA events and the host synchronizes once at the end; on
other devices with ``time.perf_counter``. Memory on CPU is the process-wide peak RSS.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` (CUDA or MPS) to finish its queued work; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - no MPS in CI
        torch.mps.synchronize()


def time_steps(step_fn: Callable[[], object], warmup: int, iters: int, device: torch.device | str) -> list[float]:
    """Run ``step_fn`` ``warmup`` times untimed, then ``iters`` times timed; per-step milliseconds.

    CUDA: one pair of events per step, recorded on ``device``'s current stream (``cuda:N`` with
    N != 0 too), one host synchronization after the loop (the measured time includes any launch
    gaps between steps, i.e. what training sees).
    Elsewhere: wall time per step with ``time.perf_counter``.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device)
    for _ in range(warmup):
        step_fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        with torch.cuda.device(device):  # Event.record() uses the current device's stream
            for s, e in zip(starts, ends):
                s.record()
                step_fn()
                e.record()
        synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step_fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median / p10 / p90 step time (ms) and images per second at the median step time."""
    if not times_ms:
        raise ValueError("no timings to summarize")
    median = float(statistics.median(times_ms))
    return {
        "step_ms_median": median,
        "step_ms_p10": _percentile(times_ms, 10),
        "step_ms_p90": _percentile(times_ms, 90),
        "img_per_s": batch_size / (median / 1e3) if median > 0 else float("inf"),
    }


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward, plus backward if ``fn`` runs it), by
    ``torch.utils.flop_counter.FlopCounterMode``; a matmul [m, k] @ [k, n] counts 2*m*k*n."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure_matmul_peak(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    n: int | None = None,
    iters: int | None = None,
    warmup: int = 3,
) -> float:
    """Achieved FLOP/s of an [n, n] @ [n, n] matmul (2*n^3 FLOPs), at the median step time.

    Defaults: n=8192, iters=20 on CUDA; n=1024, iters=5 elsewhere. Use it as the
    denominator of MFU (model FLOPs per second / this).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n if n is not None else (8192 if cuda else 1024)
    iters = iters if iters is not None else (20 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: torch.matmul(a, b, out=out), warmup=warmup, iters=iters, device=device)
    median_s = statistics.median(times) / 1e3
    return 2.0 * n**3 / median_s


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the peak-memory counter. CUDA: allocator peak stats. CPU (Linux, best effort):
    resets the process peak RSS via ``/proc/self/clear_refs``; elsewhere nothing happens."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device | str) -> int:
    """Peak memory in bytes since the last reset.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, this device). CPU: the
    *process-wide* max RSS from ``resource.getrusage`` (all memory of the process, not just
    tensors; it only resets where :func:`reset_peak_memory` can reset it, i.e. Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # macOS: bytes, Linux: KiB


def _version(package: str) -> str | None:
    """Version of ``package``: its ``__version__`` when imported (local tags such as ``+cu130`` included), else
    its installed metadata (no import: transformers takes seconds); None if not installed."""
    from importlib.metadata import PackageNotFoundError, version

    loaded = getattr(sys.modules.get(package), "__version__", None)
    if loaded:
        return str(loaded)
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> str | None:
    """Short commit of the maelab source tree (``git rev-parse --short HEAD``); None when
    maelab is not in a git checkout, there is no commit yet, or git is missing."""
    return _git("rev-parse", "--short", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files of the maelab checkout have uncommitted changes (None: unknown)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Versions and hardware to store next to benchmark results."""
    device = torch.device(device)
    import maelab

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "maelab": getattr(maelab, "__version__", None),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_bytes"] = int(props.total_memory)
        info["device_capability"] = f"{props.major}.{props.minor}"
    else:
        info["device_name"] = info["cpu"]
    return info
