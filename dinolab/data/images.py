"""Finding and reading images robustly: a corrupt or unreadable file is reported, never a crash."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_PROBLEMS_LOGGED = 20

log = logging.getLogger(__name__)


@dataclass
class ImageScan:
    """What a search for images found, and what it could not look into."""

    paths: list[Path]
    """Image files, in order (each folder's files sorted)."""
    problems: list[tuple[Path, str]] = field(default_factory=list)
    """(path, reason) of folders that could not be read, symbolic-link loops and dangling links."""


def scan_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> ImageScan:
    """Image files under the given files / folders (recursive, sorted), or listed in ``.txt`` path lists.

    Symbolic links to folders are followed (a link back to a folder being searched is a loop: reported, not
    followed). Folders that cannot be read and dangling links are reported in ``problems`` rather than dropped
    silently. A ``.txt`` source holds one image path per line (see :func:`read_path_list`).
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    scan = ImageScan([])
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found: list[Path] = []
            _walk(path, frozenset(), found, scan.problems)
            scan.paths.extend(sorted(found))
        elif path.is_file() and path.suffix.lower() == ".txt":
            scan.paths.extend(read_path_list(path))
        elif path.is_file():
            scan.paths.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an image file, a folder nor a .txt list of paths")
    return scan


def _walk(folder: Path, ancestors: frozenset, found: list[Path], problems: list[tuple[Path, str]]) -> None:
    try:
        status = folder.stat()
        entries = list(os.scandir(folder))
    except OSError as error:
        problems.append((folder, f"folder cannot be read: {error.strerror or error}"))
        return
    key = (status.st_dev, status.st_ino)
    inside = ancestors | {key}
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_dir():  # follows symbolic links
                target = path.stat()
                if (target.st_dev, target.st_ino) in inside:
                    problems.append((path, f"symbolic link loop (points back to {path.resolve()}); not followed"))
                else:
                    _walk(path, inside, found, problems)
            elif entry.is_file():
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(path)
            elif entry.is_symlink():
                problems.append((path, f"dangling symbolic link (to {os.readlink(path)})"))
        except OSError as error:
            problems.append((path, f"cannot be read: {error.strerror or error}"))


def list_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The image files of :func:`scan_images`; what could not be searched is logged as a warning."""
    scan = scan_images(sources)
    for path, reason in scan.problems[:MAX_PROBLEMS_LOGGED]:
        log.warning("not searched: %s: %s", format_path_line(path), reason)
    if len(scan.problems) > MAX_PROBLEMS_LOGGED:
        log.warning("… %d paths in all could not be searched", len(scan.problems))
    return scan.paths


def format_path_line(path: str | os.PathLike) -> str:
    """One line of a path list that :func:`parse_path_line` turns back into exactly the same path.

    Paths that are valid UTF-8 and hold no control character (newline, tab …) are written as they are; any other
    path (and one starting with a quote, ``#`` or a space) is written as a JSON string, with ``\\udcXX`` escapes
    for the bytes that are not UTF-8 (Python's ``surrogateescape``).
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        plain = text == text.strip() and not text.startswith(('"', "#")) and text.isprintable()
    except UnicodeEncodeError:
        plain = False
    return text if plain else json.dumps(text)


def parse_path_line(line: str) -> str:
    """The path written by :func:`format_path_line` (a plain line is the path itself)."""
    return json.loads(line) if line.startswith('"') else line


def read_path_list(list_file: str | os.PathLike) -> list[Path]:
    """Paths from a text file, one per line (blank lines and ``#`` comments skipped; relative paths are relative
    to the list's folder; a line in double quotes is a JSON string, see :func:`format_path_line`)."""
    list_file = Path(list_file)
    paths = []
    for line in list_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(parse_path_line(line)).expanduser()
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


# modes Pillow opens that ``convert("RGB")`` gets wrong: it clips 16/32-bit and float values to 0..255 instead of
# scaling them, and does not undo premultiplied alpha
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS", "I;32", "I;32B", "I;32L", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image Pillow opens, as 8-bit RGB, with values scaled (not clipped) from the mode's range.

    - 16-bit unsigned integers (``I;16*``, and ``I`` holding values in 0..65535): ``v * 255 / 65535``;
    - floats (``F``) in 0..1: ``v * 255``; other integer or float ranges: min-max scaled to 0..255 per image
      (there is no nominal range to scale from); NaN becomes 0;
    - premultiplied alpha (``La``, ``RGBa``) is undone, then alpha dropped; every other mode as Pillow converts it.
    """
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif image.mode != "F" and low >= 0 and high <= 65535:
            scaled = values * (255.0 / 65535.0)
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "La":
        image = image.convert("LA")
    elif image.mode == "RGBa":
        image = image.convert("RGBA")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what Pillow itself recommends for palette images with transparency
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncated files fail here, not later) and convert it to 8-bit RGB (:func:`to_rgb`)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


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
