"""Monocular depth datasets: NYU-Depth v2 (as commonly distributed), KITTI (Eigen split) and a generic image
folder / depth folder pair. Depth maps come back in metres as ``[H, W]`` float32, 0 where unknown."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class DepthSet:
    """(image, depth) path pairs of one split and how to read / score them."""

    name: str
    images: list[Path]
    depths: list[Path]
    depth_scale: float
    """Stored integer value / depth_scale = metres (1000 for NYU's millimetre PNGs, 256 for KITTI)."""
    min_depth: float
    max_depth: float
    """The range of the depth bins and of the pixels that are scored."""
    eval_crop: str = "none"
    """Region scored at evaluation, see :func:`dinolab.eval.depth.eval_crop_mask`."""
    kb_crop: bool = False
    """KITTI benchmark crop: keep the bottom-centre 352 x 1216 pixels of image and depth (as the toolbox does)."""

    def __post_init__(self) -> None:
        if len(self.images) != len(self.depths):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.depths)} depth maps")
        if not self.images:
            raise ValueError(f"{self.name}: no (image, depth) pairs found; check the dataset root and split")
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"{self.name}: need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.depth_scale <= 0:
            raise ValueError(f"{self.name}: depth_scale must be positive, got {self.depth_scale}")

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and its depth in metres (``[H, W]`` float32, 0 = no measurement)."""
        with Image.open(self.images[index]) as image:
            rgb = image.convert("RGB")
        depth = read_depth(self.depths[index], self.depth_scale)
        if depth.shape != (rgb.height, rgb.width):
            raise ValueError(
                f"{self.depths[index]}: depth map is {depth.shape} but image {self.images[index]} is "
                f"{(rgb.height, rgb.width)}; they must be pixel-aligned"
            )
        if self.kb_crop:
            rgb, depth = kb_crop(rgb, depth)
        return rgb, depth


def read_depth(path: str | os.PathLike, scale: float = 1.0) -> np.ndarray:
    """A depth map in metres: 16-bit (or 8-bit) PNG divided by ``scale``, or a float ``.npy`` used as is.

    Non-finite and negative values count as "no measurement" and become 0.
    """
    path = Path(path)
    if path.suffix == ".npy":
        depth = np.load(path, allow_pickle=False).astype(np.float32)
    else:
        with Image.open(path) as image:
            depth = np.asarray(image).astype(np.float32) / scale
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth map must be single-channel, got shape {depth.shape}")
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def kb_crop(image: Image.Image, depth: np.ndarray, height: int = 352, width: int = 1216) -> tuple:
    """The KITTI benchmark crop: bottom ``height`` rows, ``width`` centred columns."""
    top, left = max(image.height - height, 0), max((image.width - width) // 2, 0)
    box = (left, top, left + min(width, image.width), top + min(height, image.height))
    return image.crop(box), depth[box[1] : box[3], box[0] : box[2]]


def nyu(root: str | os.PathLike, split_file: str | os.PathLike | None = None) -> DepthSet:
    """NYU-Depth v2 as commonly distributed (BTS / AdaBins / depth toolbox): ``rgb_XXXXX.jpg`` next to
    ``sync_depth_XXXXX.png`` (uint16 millimetres), found recursively under ``root``, or listed in a split file
    whose lines are ``rgb_path depth_path [focal]`` relative to ``root``. Scored with the Eigen crop, 1e-3..10 m."""
    base = Path(root).expanduser()
    if split_file is not None:
        images, depths = _read_pair_list(base, base, Path(split_file))
    else:
        images = sorted(base.rglob("rgb_*.jpg"))
        depths = [p.with_name(p.name.replace("rgb_", "sync_depth_").replace(".jpg", ".png")) for p in images]
        _check_exist(depths, "NYU sync_depth")
    return DepthSet(f"nyu/{base.name}", images, depths, 1000.0, 1e-3, 10.0, eval_crop="nyu_eigen")


def kitti(
    image_root: str | os.PathLike,
    depth_root: str | os.PathLike,
    split_file: str | os.PathLike,
    use_kb_crop: bool = True,
    eval_crop: str = "kitti_garg",
) -> DepthSet:
    """KITTI with an Eigen split file: lines ``{date}/{drive}/image_02/data/N.png
    {drive}/proj_depth/groundtruth/image_02/N.png [focal]``; images under ``image_root`` (raw KITTI),
    depth under ``depth_root`` (the annotated depth set, drives possibly inside ``train/`` or ``val/``).
    Depth PNG / 256 = metres; lines whose depth is ``None`` or missing are skipped. Scored 1e-3..80 m."""
    images, depths = _read_pair_list(Path(image_root).expanduser(), Path(depth_root).expanduser(), Path(split_file))
    return DepthSet(
        f"kitti/{Path(split_file).stem}", images, depths, 256.0, 1e-3, 80.0, eval_crop=eval_crop, kb_crop=use_kb_crop
    )


def folder_pair(
    image_dir: str | os.PathLike,
    depth_dir: str | os.PathLike,
    depth_scale: float = 1000.0,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
) -> DepthSet:
    """Images under ``image_dir`` with depth maps of the same relative path and stem under ``depth_dir``: 16-bit
    PNG (value / ``depth_scale`` = metres) or ``.npy`` (metres)."""
    image_dir, depth_dir = Path(image_dir).expanduser(), Path(depth_dir).expanduser()
    if not image_dir.is_dir() or not depth_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} or depth folder {depth_dir} does not exist")
    images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    depths = []
    for image in images:
        stem = depth_dir / image.relative_to(image_dir).with_suffix("")
        found = [stem.with_suffix(ext) for ext in (".png", ".npy") if stem.with_suffix(ext).is_file()]
        if not found:
            raise FileNotFoundError(f"no depth map {stem}.png or {stem}.npy for image {image}")
        depths.append(found[0])
    return DepthSet(f"folder/{image_dir.name}", images, depths, depth_scale, min_depth, max_depth)


def _read_pair_list(image_root: Path, depth_root: Path, split_file: Path) -> tuple[list[Path], list[Path]]:
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} does not exist")
    images, depths = [], []
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{split_file}:{number}: expected 'image_path depth_path [focal]', got {line!r}")
        if fields[1] == "None":  # Eigen test frames without ground truth
            continue
        image = _resolve(image_root, fields[0], ())
        depth = _resolve(depth_root, fields[1], ("train", "val"))
        if image is None or depth is None:
            continue  # the annotated set lacks some raw frames; the toolbox skips them too
        images.append(image)
        depths.append(depth)
    return images, depths


def _resolve(root: Path, relative: str, subdirs: tuple[str, ...]) -> Path | None:
    relative = relative.lstrip("/")
    for candidate in [root / relative, *(root / sub / relative for sub in subdirs)]:
        if candidate.is_file():
            return candidate
    return None


def _check_exist(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} file(s) missing, e.g. {missing[0]}")
