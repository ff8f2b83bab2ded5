"""What keeps a run directory consistent while :func:`dinolab.train.loop.train` works in it.

- one writer: the main process holds an advisory lock on the run directory (:class:`~dinolab.runtime.RunLock`),
  so a second ``dinolab train`` on it stops at once with a message naming the holder;
- a refused resume changes nothing: ``config.json`` is written (atomically) only after the resume check passed;
- SIGTERM / SIGINT end the current step, then a checkpoint is written and ``train`` returns
  (:class:`~dinolab.runtime.StopRequest`; under torchrun the ranks agree on stopping at the same step);
- no duplicate lines: on resume, ``metrics.jsonl`` keeps only the records up to the checkpoint's iteration (the
  iterations after it are run, and logged, again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from dinolab.runtime import RunLock, StopRequest, atomic_write_text
from dinolab.train.config import TrainConfig
from dinolab.train.distributed import DistEnv

METRICS_FILE = "metrics.jsonl"


class RunGuard:
    """Context manager around a training run: the lock (main process) and the signal handlers (every process)."""

    def __init__(self, run_dir: str | os.PathLike, main: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.main = int(os.environ.get("RANK", "0")) == 0 if main is None else main
        self.lock = RunLock(self.run_dir)
        self.stop = StopRequest()

    def __enter__(self) -> RunGuard:
        if self.main:
            self.lock.acquire()
        self.stop.__enter__()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.__exit__()
        self.lock.release()

    def save_config(self, config: TrainConfig) -> None:
        """``config.json`` of the run, replaced whole (never a half-written file)."""
        atomic_write_text(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    def stop_requested(self, env: DistEnv) -> bool:
        """Whether a signal asked to stop, on any rank (a collective under torchrun: every rank calls it)."""
        if not (env.distributed and dist.is_initialized()):
            return self.stop.requested
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def forget_after(self, step: int) -> None:
        """Drop the ``metrics.jsonl`` records of iterations after ``step`` (the run continues from ``step``)."""
        path = self.run_dir / METRICS_FILE
        if not self.main or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and _step_of(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a line cut by a crash: dropped
