"""Benchmark helpers (timing, FLOPs, MFU peak, memory, environment) and the Hugging Face reference."""

from maelab.bench.measure import (
    count_flops,
    environment_info,
    measure_matmul_peak,
    peak_memory,
    reset_peak_memory,
    summarize,
    time_steps,
)

__all__ = [
    "count_flops",
    "environment_info",
    "measure_matmul_peak",
    "peak_memory",
    "reset_peak_memory",
    "summarize",
    "time_steps",
]
