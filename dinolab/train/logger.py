"""Metrics of a run: JSON lines (one object per log step), TensorBoard scalars, and readable console lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events in the run directory (main process only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_line(step: int, total: int, metrics: dict[str, Any], seconds_left: float) -> str:
    """``[ 120/3000] loss 9.12 (dino 8.1 ibot 0.9 koleo -0.4) targets H 0.41 used 58/64 agree 0.62 lr 1.2e-04 …
    36 img/s, 0:41 left`` (target health: the DINO targets' row entropy / log K, prototypes used, agreement)."""
    health = ""
    if "health/dino_row_entropy" in metrics:
        health = (
            f"targets H {metrics['health/dino_row_entropy']:.2f} used {metrics['health/dino_prototypes_used']} "
            f"agree {metrics.get('health/dino_agreement', float('nan')):.2f} "
        )
    return (
        f"[{step:>{len(str(total))}}/{total}] loss {metrics['loss/total']:.4f} "
        f"(dino {metrics['loss/dino']:.4f} ibot {metrics['loss/ibot']:.4f} koleo {metrics['loss/koleo']:.4f}) "
        f"{health}lr {metrics['lr']:.2e} wd {metrics['wd']:.3f} mom {metrics['momentum']:.4f} "
        f"T {metrics['teacher_temp']:.3f} {metrics['images_per_s']:.1f} img/s, {_format_duration(seconds_left)} left"
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged metrics of a run, in order (for plots and reports)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
