"""Writers of tiny datasets shared by the dense-evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_rgb(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_gray(path: Path, array: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    Image.fromarray(array.astype(dtype)).save(path)
    return path


def two_region_sample(rng: np.random.Generator, height: int = 56, width: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """An image whose left part is reddish (class 0) and right part bluish (class 1), split at a random column."""
    split = int(rng.integers(width // 4, 3 * width // 4))
    label = np.zeros((height, width), dtype=np.uint8)
    label[:, split:] = 1
    image = rng.integers(0, 40, size=(height, width, 3))
    image[label == 0, 0] += 200
    image[label == 1, 2] += 200
    return image.astype(np.uint8), label


def frame_videos(root, per_class: int, seed: int, frames: int = 6) -> None:
    """Two classes: a bright square moving left->right ("Right") or right->left ("Left") over noise."""
    rng = np.random.default_rng(seed)
    for cls in ("Left", "Right"):
        for v in range(per_class):
            for f in range(frames):
                image = rng.integers(0, 60, (32, 32, 3))
                x = int(2 + 20 * f / (frames - 1))
                x = x if cls == "Right" else 22 - x
                image[10:20, x : x + 8] = (255, 220, 40) if cls == "Right" else (40, 220, 255)
                write_rgb(root / cls / f"v_{cls}_{v}" / f"frame_{f + 1:04d}.jpg", image)
