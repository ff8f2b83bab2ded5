"""What the step benchmarks share: the peers' command line and the timing (no dinolab import: a peer's process
pays for nothing of dinolab's)."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch

PEER_WIDTHS = {
    "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
}  # fmt: skip
"""width, depth, heads of the ViTs the peer steps build (as dinolab's variants of the same names)."""


def peer_step_arguments(description: str) -> argparse.ArgumentParser:
    """The flags a peer step shares with train_step.py (its other flags are ignored by the peers)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(PEER_WIDTHS), default="vit_small")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--depth", type=int, default=0, help="0 = the variant's depth")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--drop-path", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    return parser


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


def print_peer_record(args: argparse.Namespace, step_time: float, peak_mb: float, peer: str) -> None:
    """The peer's one JSON line, with train_step.py's keys for the step time, throughput and peak memory."""
    record = {
        "step_time_s": round(step_time, 4),
        "images_per_s": round(args.batch_size / step_time, 2),
        "peak_memory_mb": round(peak_mb, 1),
        "arch": args.arch,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "peer": peer,
    }
    print(json.dumps(record), flush=True)
