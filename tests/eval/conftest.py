"""Shared fixtures of the evaluation tests: one BLAS/torch thread (the CI machine has 2 busy cores, where
thread contention makes tiny fits 20x slower) and a small labelled image tree made from sklearn's digits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)


def write_digits_tree(root: Path, per_class: int, offset: int = 0, size: int = 28) -> Path:
    """``root/<digit>/<i>.png``: ``per_class`` 8x8 digits per class upsampled to ``size`` px RGB."""
    digits = load_digits()
    for label in range(10):
        members = np.flatnonzero(digits.target == label)[offset : offset + per_class]
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i in members:
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB")
            image.save(root / str(label) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Disjoint train (12 per class) and val (4 per class) image folders."""
    base = tmp_path_factory.mktemp("digits")
    return write_digits_tree(base / "train", 12), write_digits_tree(base / "val", 4, offset=12)
