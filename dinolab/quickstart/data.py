"""Built-in data for the quickstart: real images shipped inside package dependencies (no download).

- scikit-learn's handwritten digits (1797 images, 10 classes), upscaled and written as an ImageFolder tree with
  a stratified train/val split: the pretraining set (labels unused) and the labelled evaluation set.
- scikit-image's sample photographs: the pictures of the report (PCA of patch features, attention maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")


@dataclass(frozen=True)
class DigitsSplit:
    """Where the digits were written: ``train/<class>/*.png`` and ``val/<class>/*.png``."""

    root: Path
    train: Path
    val: Path
    num_train: int
    num_val: int


def write_digits(root: str | Path, size: int = 32, val_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits as ``size x size`` RGB PNGs in an ImageFolder tree (idempotent)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    marker = root / ".complete"
    if not marker.is_file():
        for folder, split in ((train_dir, train_idx), (val_dir, val_idx)):
            for i in split:
                target = folder / str(digits.target[i]) / f"digit_{i:04d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                picture = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
                picture.save(target)
        marker.write_text("ok\n")
    return DigitsSplit(root, train_dir, val_dir, len(train_idx), len(val_idx))


def write_photos(root: str | Path) -> list[Path]:
    """scikit-image's sample photographs as RGB PNGs."""
    from skimage import data

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_PHOTOS:
        path = root / f"{name}.png"
        if not path.is_file():
            array = getattr(data, name)()
            image = Image.fromarray(array)
            image.convert("RGB").save(path)
        paths.append(path)
    return paths
