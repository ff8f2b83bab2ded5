"""Timing of training steps shared by train_step.py and peer_lightly.py (no dinolab import: the peer's process
pays for nothing of dinolab's)."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def time_steps(run_step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds of ``steps`` calls of ``run_step(index)`` after ``warmup`` untimed ones, and the peak memory
    in MB: ``max_memory_allocated`` over the timed steps on CUDA, the process's peak resident set on CPU."""
    cuda = device.type == "cuda"
    times = []
    for index in range(warmup + steps):
        if index == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(index)
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return statistics.median(times), peak_mb
