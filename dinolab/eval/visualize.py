"""Pictures of dense predictions: image | prediction | ground truth, written as PNG with matplotlib (Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _figure(ncols: int) -> tuple[Figure, list]:
    # A bare Figure renders with Agg and never touches pyplot's global state or a display.
    fig = Figure(figsize=(4 * ncols, 3.5), layout="constrained")
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for axis in axes:
        axis.set_axis_off()
    return fig, axes


def class_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed random colour per class, ``[num_classes, 3]`` uint8 (ignored pixels are drawn black)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def colorize(label: np.ndarray, num_classes: int) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` colours; ``IGNORE_INDEX`` (and out-of-range ids) black."""
    palette = np.concatenate([class_palette(num_classes), np.zeros((1, 3), dtype=np.uint8)])
    index = np.where((label >= 0) & (label < num_classes), label, num_classes)
    return palette[index]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def save_segmentation_picture(
    image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, path: str | os.PathLike, num_classes: int
) -> Path:
    """Image ``[H, W, 3]`` uint8, predicted ``[H, W]`` classes and (optionally) the ground truth side by side."""
    panels = [("image", image), ("prediction", colorize(pred, num_classes))]
    if label is not None:
        panels.append(("ground truth (ignored: black)", colorize(label, num_classes)))
    fig, axes = _figure(len(panels))
    for axis, (title, picture) in zip(axes, panels):
        axis.imshow(picture)
        axis.set_title(title)
    return _save(fig, path)


def save_depth_picture(image: np.ndarray, pred: np.ndarray, depth: np.ndarray | None, path: str | os.PathLike) -> Path:
    """Image, predicted depth and (optionally) the ground-truth depth (0 = unknown, left blank) on one colour
    scale, in metres."""
    valid = depth[depth > 0] if depth is not None else np.zeros(0)
    reference = valid if valid.size else pred.reshape(-1)
    vmin, vmax = float(np.percentile(reference, 1)), float(np.percentile(reference, 99))
    vmax = max(vmax, vmin + 1e-6)
    fig, axes = _figure(3 if depth is not None else 2)
    axes[0].imshow(image)
    axes[0].set_title("image")
    shown = axes[1].imshow(pred, cmap="magma_r", vmin=vmin, vmax=vmax)
    axes[1].set_title("prediction")
    if depth is not None:
        axes[2].imshow(np.ma.masked_where(depth <= 0, depth), cmap="magma_r", vmin=vmin, vmax=vmax)
        axes[2].set_title("ground truth")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="depth")
    return _save(fig, path)
