"""Device, precision and seeding helpers."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from maelab.errors import ConfigError, DeviceMemoryError


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available else cpu; a CUDA request without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid device={name!r}: CUDA is not available here; use device=cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("invalid precision='fp16': fp16 training needs CUDA; use bf16 or fp32 on CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for bf16/fp16; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def out_of_memory_advice(batch_size: int, accum_steps: int, global_batch: int = 0) -> str:
    """What to change when a training step at ``batch_size`` images per process does not fit in memory."""
    if batch_size < 2:
        return "use a smaller model or input size"
    if global_batch:
        return (
            f"lower --batch-size, e.g. --batch-size {batch_size // 2}: global_batch={global_batch} then takes "
            f"more accumulation steps (now accum_steps={accum_steps})"
        )
    return (
        f"lower --batch-size and raise accum_steps by the same factor to keep the batch per optimizer step, "
        f"e.g. --batch-size {batch_size // 2} --accum-steps {accum_steps * 2}"
    )


@contextlib.contextmanager
def explain_out_of_memory(cfg: Any, device: torch.device) -> Iterator[None]:
    """Turn an out-of-memory error of a training step into a one-line DeviceMemoryError naming the
    per-process batch size (``cfg.batch_size``) and what to change (:func:`out_of_memory_advice`)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        advice = out_of_memory_advice(cfg.batch_size, cfg.accum_steps, cfg.global_batch)
        raise DeviceMemoryError(
            f"out of memory on {device} in a training step at batch_size={cfg.batch_size} per process: {advice}"
        ) from e


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint from a process that saw more GPUs restores the devices this one has
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
