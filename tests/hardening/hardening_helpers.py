"""Helpers of the hardening tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.config import apply_overrides
from dinolab.train.config import TrainConfig
from dinolab.train.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]


def write_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_config(data: Path, out: Path, *overrides: str) -> TrainConfig:
    return apply_overrides(get_recipe("test_tiny"), [f"run.data={data}", f"run.output_dir={out}", *overrides])


def run_python(code: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process (what a user's shell would start), output captured."""
    # the thread count is inherited: a run resumed in this process must compute exactly as the killed one did
    # (a different number of threads sums in another order, and "exact resume" compares with atol=0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
