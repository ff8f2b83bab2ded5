"""The DINOv2 PCA picture of patch features, and last-layer CLS attention maps.

The DINOv2 paper's figure (Oquab et al. 2023, Fig. 1 / Sec. 7.3): a first PCA over the patches of all images
together; its first component, thresholded, separates foreground from background; a second PCA on the
foreground patches only gives three components shown as RGB. Because both PCAs are fitted jointly over all the
images, matching parts of different images get matching colours.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from sklearn.decomposition import PCA
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dinolab.data.images import ImageBatch, ImageFileDataset, collate_loaded, load_rgb
from dinolab.data.transforms import Resolution
from dinolab.features.embed import embed_images
from dinolab.runtime import autocast_context, resolve_device


def _as_numpy(tokens: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(tokens, Tensor):
        tokens = tokens.detach().float().cpu().numpy()
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 4:
        raise ValueError(f"expected patch tokens shaped [B, h, w, D], got shape {tokens.shape}")
    return tokens


def _border(height: int, width: int) -> np.ndarray:
    border = np.zeros((height, width), dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    return border  # [h, w]


def first_component(patch_tokens: np.ndarray | Tensor) -> np.ndarray:
    """First principal component of all patches together, in units of its standard deviation, ``[B, h, w]``.

    Its sign is arbitrary in PCA; it is oriented so that the image borders (mostly background in object-centric
    pictures) score lower than the interior. Grids too small to have an interior are oriented so that the
    positive side is the minority.
    """
    tokens = _as_numpy(patch_tokens)
    batch, height, width, dim = tokens.shape
    score = PCA(n_components=1).fit_transform(tokens.reshape(-1, dim))[:, 0]  # [B*h*w]
    score = (score / (score.std() + 1e-12)).reshape(batch, height, width)
    if height > 2 and width > 2:
        border = _border(height, width)
        flip = score[:, border].mean() > score[:, ~border].mean()
    else:
        flip = (score > 0).mean() > 0.5
    return -score if flip else score


def foreground_mask(patch_tokens: np.ndarray | Tensor, threshold: float = 0.0) -> np.ndarray:
    """Foreground patches ``[B, h, w]``: the first principal component (see :func:`first_component`) above
    ``threshold`` standard deviations. ``0`` keeps the positive side, as in the DINOv2 paper."""
    return first_component(patch_tokens) > threshold


def pca_rgb(
    patch_tokens: np.ndarray | Tensor, *, threshold: float | None = 0.0, mask: np.ndarray | None = None
) -> np.ndarray:
    """Patch tokens ``[B, h, w, D]`` -> RGB ``[B, h, w, 3]`` in ``[0, 1]``, background black.

    The foreground is ``mask`` when given, else :func:`foreground_mask` at ``threshold``, else (``threshold=None``)
    every patch. A PCA with three components is fitted on the foreground patches of all images together; each
    component is min-max scaled over those patches to one colour channel.
    """
    tokens = _as_numpy(patch_tokens)
    batch, height, width, _ = tokens.shape
    if mask is None:
        mask = foreground_mask(tokens, threshold) if threshold is not None else np.ones(tokens.shape[:3], bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tokens.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match the patch grid {tokens.shape[:3]}")
    if mask.sum() < 3:
        warnings.warn(
            f"only {int(mask.sum())} foreground patches; colouring all patches instead (lower the threshold)",
            stacklevel=2,
        )
        mask = np.ones_like(mask)
    foreground = tokens[mask]  # [F, D]
    components = PCA(n_components=3).fit_transform(foreground)  # [F, 3]
    low, high = components.min(axis=0), components.max(axis=0)
    scaled = np.where(high > low, (components - low) / np.maximum(high - low, 1e-12), 0.5)
    rgb = np.zeros((batch, height, width, 3), dtype=np.float32)
    rgb[mask] = scaled
    return rgb


@torch.inference_mode()
def cls_attention(model: nn.Module, images: Tensor) -> Tensor:
    """Last-block attention of the CLS token to every patch, per head: ``[B, C, H, W]`` -> ``[B, heads, h, w]``."""
    attention = model.get_last_self_attention(images)  # [B, heads, T, T], T = 1 + R + h*w
    first_patch = 1 + getattr(model, "num_register_tokens", 0)
    rows, cols = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return attention[:, :, 0, first_patch:].float().reshape(images.shape[0], -1, rows, cols)


# ----------------------------------------------------------------------------------------------- pictures
def _upsample(array: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """``[h, w, 3]`` floats in [0, 1] -> a PIL image of ``size = (H, W)``, nearest (patches stay visible)."""
    image = Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8))
    return image.resize((size[1], size[0]), Image.Resampling.NEAREST)


def _row(tiles: Sequence[Image.Image], columns: int = 8, gap: int = 4) -> Image.Image:
    """Tiles of equal size on a white sheet, ``columns`` per row."""
    width, height = tiles[0].size
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, tile in enumerate(tiles):
        row, col = divmod(index, columns)
        sheet.paste(tile, (col * (width + gap), row * (height + gap)))
    return sheet


def render_pca(image: Image.Image, rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The input resized to ``size = (H, W)`` beside its PCA colours ``[h, w, 3]``."""
    shown = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return _row([shown, _upsample(rgb, size)])


def render_attention(image: Image.Image, maps: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The input, the head-averaged CLS attention, then each head's ``[heads, h, w]`` map (viridis)."""
    colormap = colormaps["viridis"]
    shown = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    tiles = [shown]
    for single in [maps.mean(axis=0), *maps]:
        low, high = single.min(), single.max()
        normalised = (single - low) / (high - low) if high > low else np.zeros_like(single)
        tiles.append(_upsample(colormap(normalised)[..., :3], size))
    return _row(tiles)


@dataclass
class PcaReport:
    """What :func:`pca_pictures` wrote."""

    pictures: list[Path]  # one PCA picture per readable image
    attention: list[Path] = field(default_factory=list)  # one attention picture per readable image (if asked)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images and why


def _attention_maps(
    model: nn.Module, paths: Sequence[Path], resolution: Resolution, batch_size: int, dtype: str, device: torch.device
) -> np.ndarray:
    loader = DataLoader(
        ImageFileDataset(paths, resolution.transform()), batch_size=batch_size, collate_fn=collate_loaded
    )
    maps = []
    batch: ImageBatch
    for batch in loader:
        if batch.images is None or batch.failures:  # the same files were just read successfully
            raise RuntimeError(f"images became unreadable between passes: {batch.failures}")
        with autocast_context(device, dtype):
            maps.append(cls_attention(model, batch.images.to(device)).cpu().numpy())
    return np.concatenate(maps)  # [N, heads, h, w]


def pca_pictures(
    model: nn.Module,
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (448, 448),
    threshold: float | None = 0.0,
    attention: bool = False,
    batch_size: int = 8,
    num_workers: int = 0,
    dtype: str = "fp32",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PcaReport:
    """Write ``NNN_<name>_pca.png`` (input | PCA colours) per image, and ``NNN_<name>_attention.png`` with
    ``attention``. The PCA is fitted jointly over all the images; ``threshold=None`` skips the background removal.
    """
    device = resolve_device(device)
    resolution = Resolution(mode="resize", height=image_size[0], width=image_size[1])
    result = embed_images(
        model,
        sources,
        outputs=("patch_tokens",),
        resolution=resolution,
        batch_size=batch_size,
        num_workers=num_workers,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    report = PcaReport(pictures=[], failed=result.failed)
    if not result.paths:
        return report
    grid = result.patch_grid
    tokens = result.features["patch_tokens"].reshape(len(result.paths), grid[0], grid[1], -1)  # [N, h, w, D]
    rgb = pca_rgb(tokens, threshold=threshold)  # [N, h, w, 3]
    maps = _attention_maps(model, result.paths, resolution, batch_size, dtype, device) if attention else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(result.paths):
        image = load_rgb(path)
        # the index keeps names unique when two folders hold files of the same name
        stem = f"{index:03d}_{path.stem}"
        report.pictures.append(out_dir / f"{stem}_pca.png")
        render_pca(image, rgb[index], result.input_size).save(report.pictures[-1])
        if maps is not None:
            report.attention.append(out_dir / f"{stem}_attention.png")
            render_attention(image, maps[index], result.input_size).save(report.attention[-1])
    return report
