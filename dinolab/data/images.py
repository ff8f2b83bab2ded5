"""Finding and reading images robustly: a corrupt or unreadable file is reported, never a crash."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image files under the given files / folders (recursive, sorted), or listed in ``.txt`` path lists.

    A ``.txt`` source holds one image path per line (relative paths are relative to the list's folder).
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        elif path.is_file() and path.suffix.lower() == ".txt":
            found.extend(read_path_list(path))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an image file, a folder nor a .txt list of paths")
    return found


def read_path_list(list_file: str | os.PathLike) -> list[Path]:
    """Paths from a text file, one per line (blank lines and ``#`` comments skipped)."""
    list_file = Path(list_file)
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncated files fail here, not later) and convert it to RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


@dataclass
class LoadedImage:
    """One dataset item: the image tensor, or the reason it could not be read."""

    index: int
    image: Tensor | None
    error: str | None = None


class ImageFileDataset(Dataset):
    """Images from a list of paths; failures come back as ``LoadedImage(error=...)`` instead of raising."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable[[Image.Image], Tensor]) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        try:
            return LoadedImage(index, self.transform(load_rgb(self.paths[index])))
        except Exception as error:  # PIL raises many types for bad files; report them all
            return LoadedImage(index, None, f"{type(error).__name__}: {error}")


@dataclass
class ImageBatch:
    """A batch of readable images and the failures met while building it."""

    indices: Tensor  # [B] dataset indices of the images
    images: Tensor | None  # [B, C, H, W], None when every image of the batch failed
    failures: list[tuple[int, str]]  # (dataset index, error message)


def collate_loaded(items: list[LoadedImage]) -> ImageBatch:
    good = [item for item in items if item.image is not None]
    failures = [(item.index, item.error or "unknown error") for item in items if item.image is None]
    images = torch.stack([item.image for item in good]) if good else None
    return ImageBatch(torch.tensor([item.index for item in good], dtype=torch.long), images, failures)
