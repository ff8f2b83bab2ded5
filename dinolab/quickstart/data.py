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
    """Where a built-in labelled set was written: ``train/<class>/*.png`` and ``val/<class>/*.png``."""

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


TEXTURE_SOURCES = ("brick", "grass", "gravel", "coins", "moon", "camera", "hubble_deep_field", "retina", "cell")


def write_textures(
    root: str | Path, size: int = 32, train_per_class: int = 140, val_per_class: int = 60, seed: int = 0
) -> DigitsSplit:
    """A second real-image classification set, also shipped inside scikit-image: grey patches of nine photographs
    (brick, grass, gravel, coins, moon, the cameraman, the Hubble deep field, a retina, cells), the class being the
    photograph. Patches of random size (``size`` to ``2 x size`` pixels, resized to ``size``) come from the left
    60 % of each photograph for train and from the right 40 % for val, so no val pixel is ever seen in training.
    Written as ``train/<class>/*.png`` and ``val/<class>/*.png`` (idempotent)."""
    from skimage import data

    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    marker = root / ".complete"
    if not marker.is_file():
        rng = np.random.default_rng(seed)
        for name in TEXTURE_SOURCES:
            photo = Image.fromarray(getattr(data, name)()).convert("L")
            width, height = photo.size
            split = int(width * 0.6)
            for folder, (left, right), count in (
                (train_dir, (0, split), train_per_class),
                (val_dir, (split, width), val_per_class),
            ):
                (folder / name).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    side = int(rng.integers(size, 2 * size + 1))
                    x = int(rng.integers(left, right - side + 1))
                    y = int(rng.integers(0, height - side + 1))
                    patch = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
                    patch.convert("RGB").save(folder / name / f"{name}_{i:04d}.png")
        marker.write_text("ok\n")
    count = len(TEXTURE_SOURCES)
    return DigitsSplit(root, train_dir, val_dir, count * train_per_class, count * val_per_class)


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
