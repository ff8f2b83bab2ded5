"""Embed image files with a frozen backbone: CLS, pooled patch, patch and register features, row-aligned with paths.

The library side of ``dinolab embed``: usable from Python as ::

    from dinolab.features import embed_images
    from dinolab.hub import load_backbone

    result = embed_images(load_backbone("dinov2_vits14"), ["photos/"], outputs=("cls", "patch_pooled"))
    result.features["cls"]  # [N, 384], row i <-> result.paths[i]
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dinolab.data.images import ImageFileDataset
from dinolab.data.transforms import Resolution
from dinolab.features.extract import extract_features
from dinolab.runtime import check_dtype

# name -> what it holds; the order is the order of the output files
OUTPUTS: dict[str, str] = {
    "cls": "normalised CLS token [N, D]",
    "patch_pooled": "mean of the normalised patch tokens [N, D]",
    "patch_tokens": "normalised patch tokens [N, h*w, D] (row-major patch grid)",
    "registers": "normalised register tokens [N, R, D]",
}


@dataclass
class EmbeddingResult:
    """Features of the readable images, row-aligned with ``paths``, and the images that could not be read."""

    paths: list[Path]  # [N] images that were embedded, in input order
    features: dict[str, np.ndarray]  # output name -> [N, ...] float32
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (path, error message)
    input_size: tuple[int, int] = (0, 0)  # (H, W) the model saw
    patch_grid: tuple[int, int] = (0, 0)  # (h, w) patches per side
    seconds: float = 0.0  # wall time of reading + embedding

    @property
    def num_requested(self) -> int:
        return len(self.paths) + len(self.failed)

    @property
    def images_per_s(self) -> float:
        """Embedded images per second of wall time (reading and preprocessing included)."""
        return len(self.paths) / self.seconds if self.seconds > 0 else 0.0


def check_outputs(model: nn.Module, outputs: Sequence[str]) -> list[str]:
    """Validate the requested outputs against :data:`OUTPUTS` and the model (registers need register tokens)."""
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; choose from {list(OUTPUTS)}")
    if "registers" in outputs and not getattr(model, "num_register_tokens", 0):
        raise ValueError(
            "registers were requested but the model has no register tokens; use a register model "
            "(e.g. dinov2_vits14_reg) or drop --registers"
        )
    return [name for name in OUTPUTS if name in outputs]  # canonical order, no duplicates


def token_features(outputs: Sequence[str]) -> Callable[[nn.Module, Tensor], dict[str, Tensor]]:
    """A feature function for :func:`~dinolab.features.extract.extract_features` returning the named outputs.

    Works with any backbone whose ``forward_features`` returns the official DINOv2 dict (dinolab's, the official
    torch.hub models).
    """
    wanted = list(outputs)

    def features(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
        out = model.forward_features(images)  # [B, C, H, W] -> official dict
        patches = out["x_norm_patchtokens"]  # [B, h*w, D]
        all_outputs = {
            "cls": lambda: out["x_norm_clstoken"],  # [B, D]
            "patch_pooled": lambda: patches.mean(dim=1),  # [B, D]
            "patch_tokens": lambda: patches,  # [B, h*w, D]
            "registers": lambda: out["x_norm_regtokens"],  # [B, R, D]
        }
        return {name: all_outputs[name]() for name in wanted}

    return features


def estimate_bytes(
    num_images: int, input_size: tuple[int, int], patch_size: int, dim: int, outputs: Sequence[str], registers: int
) -> int:
    """Float32 bytes the requested outputs take in memory and on disk."""
    patches = (input_size[0] // patch_size) * (input_size[1] // patch_size)
    per_image = {"cls": dim, "patch_pooled": dim, "patch_tokens": patches * dim, "registers": registers * dim}
    return 4 * num_images * sum(per_image[name] for name in outputs)


def embed_images(
    model: nn.Module,
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    outputs: Sequence[str] = ("cls",),
    resolution: Resolution | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    dtype: str = "fp32",
    device: torch.device | str | None = None,
    progress: bool = True,
    expand: bool = True,
) -> EmbeddingResult:
    """Embed images with a frozen backbone.

    ``sources``: image files, folders (searched recursively) and ``.txt`` path lists (see
    :func:`~dinolab.data.images.list_images`); with ``expand=False`` they are taken as image paths as they are.
    ``outputs``: any of :data:`OUTPUTS`. ``dtype``: compute precision under autocast (features come back as
    float32). Unreadable or corrupt images do not stop the run: they are returned in ``failed`` with the error, as
    are the folders and links that could not be searched (with ``expand``).
    """
    from dinolab.data.images import scan_images
    from dinolab.data.shards import ImageSourceDataset, only_files, open_images

    resolution = resolution or Resolution()
    resolution.check_patch_size(model.patch_size)
    check_dtype(dtype)
    wanted = check_outputs(model, outputs)
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    sources = list(sources)
    if expand and not only_files(sources):  # tar shards / hf-disk: datasets, read by index
        images = open_images(sources)
        scan, paths = None, [Path(name) for name in images.names()]
        dataset = ImageSourceDataset(images, resolution.transform())
    else:
        scan = scan_images(sources) if expand else None
        paths = scan.paths if scan is not None else [Path(p) for p in sources]
        dataset = ImageFileDataset(paths, resolution.transform())
    start = time.perf_counter()
    extracted = extract_features(
        model,
        dataset,
        feature_fn=token_features(wanted),
        batch_size=batch_size,
        num_workers=num_workers,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    height, width = resolution.input_size
    grid = (height // model.patch_size, width // model.patch_size)
    # every requested output exists, with zero rows when no image could be read
    empty_shapes = {
        "cls": (model.embed_dim,),
        "patch_pooled": (model.embed_dim,),
        "patch_tokens": (grid[0] * grid[1], model.embed_dim),
        "registers": (getattr(model, "num_register_tokens", 0), model.embed_dim),
    }
    features = {name: extracted.features.get(name, np.zeros((0, *empty_shapes[name]), np.float32)) for name in wanted}
    return EmbeddingResult(
        paths=[paths[i] for i in extracted.indices.tolist()],
        features=features,
        failed=[(paths[i], error) for i, error in sorted(extracted.failures)]
        + [(path, f"not searched: {reason}") for path, reason in (scan.problems if scan is not None else [])],
        input_size=(height, width),
        patch_grid=grid,
        seconds=seconds,
    )
