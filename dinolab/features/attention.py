"""Self-attention maps of the CLS and register tokens: what a block's prefix tokens look at, per head.

The picture of the DINO papers (Caron et al. 2021, Fig. 1; Darcet et al. 2024, Fig. 1): the attention of the CLS
token of the last block over the patches, one map per head, at any input resolution. Register tokens (models with
registers) are queries too: their maps show where the registers read from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dinolab.data.images import ImageFileDataset, collate_loaded, list_images, load_rgb
from dinolab.data.transforms import Resolution
from dinolab.features.pca import render_attention
from dinolab.models.vit import DinoVisionTransformer
from dinolab.runtime import autocast_context, resolve_device


@dataclass(frozen=True)
class TokenAttention:
    """Attention of the prefix tokens (CLS, then the registers) of one block over every token.

    ``weights[b, q, h, t]`` is head ``h``'s softmax weight from query ``q`` (0 = CLS, 1..R = registers) to key
    token ``t`` (CLS, registers, then the ``rows x cols`` patches in row-major order); it sums to one over ``t``.
    """

    weights: Tensor  # [B, 1 + R, heads, T]
    num_register_tokens: int
    grid: tuple[int, int]  # (rows, cols) of patches
    block: int  # index of the block, counted from 0

    def patch_maps(self) -> Tensor:
        """Attention of every prefix token to the patches, ``[B, 1 + R, heads, rows, cols]``."""
        batch, queries, heads, _ = self.weights.shape
        return self.weights[..., 1 + self.num_register_tokens :].reshape(batch, queries, heads, *self.grid)

    @property
    def cls(self) -> Tensor:
        """CLS-token attention to the patches, ``[B, heads, rows, cols]``."""
        return self.patch_maps()[:, 0]

    @property
    def registers(self) -> Tensor:
        """Register-token attention to the patches, ``[B, R, heads, rows, cols]`` (``R = 0`` without registers)."""
        return self.patch_maps()[:, 1:]


@torch.inference_mode()
def token_attention(model: DinoVisionTransformer, images: Tensor, block: int = -1) -> TokenAttention:
    """Attention of the CLS and register tokens of ``block`` (default the last) for normalised images
    ``[B, 3, H, W]``, any size that is a multiple of the patch size."""
    prefix = 1 + model.num_register_tokens
    weights = model.get_self_attention(images, block=block, num_queries=prefix)  # [B, heads, 1 + R, T]
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    index = block + len(model.blocks) if block < 0 else block
    return TokenAttention(weights.float().transpose(1, 2), model.num_register_tokens, grid, index)


@dataclass
class AttentionReport:
    """What :func:`attention_pictures` wrote."""

    pictures: list[Path] = field(default_factory=list)  # PNGs: per image the CLS picture, then one per register
    maps: Path | None = None  # attention.npy, [N, 1 + R, heads, rows, cols] float32
    paths: list[Path] = field(default_factory=list)  # the images, in the order of the rows of attention.npy
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images and why


def attention_pictures(
    model: DinoVisionTransformer,
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (448, 448),
    block: int = -1,
    registers: bool = False,
    batch_size: int = 8,
    num_workers: int = 0,
    dtype: str = "fp32",
    device: torch.device | str | None = None,
) -> AttentionReport:
    """Write ``NNN_<name>_attention.png`` (input | head mean | each head) per image, ``NNN_<name>_reg<r>.png`` per
    register token with ``registers``, and every map as ``attention.npy`` with ``paths.txt`` naming its rows."""
    device = resolve_device(device)
    paths = list_images(sources)
    if not paths:
        raise ValueError(f"no images found in {sources}")
    resolution = Resolution(mode="resize", height=image_size[0], width=image_size[1])
    resolution.check_patch_size(model.patch_size)
    loader = DataLoader(
        ImageFileDataset(paths, resolution.transform()),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_loaded,
    )
    model = model.to(device).eval()
    report = AttentionReport()
    maps = []
    for batch in loader:
        report.failed.extend((paths[index], error) for index, error in batch.failures)
        if batch.images is None:
            continue
        with autocast_context(device, dtype):
            maps.append(token_attention(model, batch.images.to(device), block).patch_maps().cpu().numpy())
        report.paths.extend(paths[index] for index in batch.indices.tolist())
    if not maps:
        return report
    all_maps = np.concatenate(maps)  # [N, 1 + R, heads, rows, cols]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.maps = out / "attention.npy"
    np.save(report.maps, all_maps)
    (out / "paths.txt").write_text("".join(f"{p}\n" for p in report.paths))
    for index, path in enumerate(report.paths):
        image = load_rgb(path)
        stem = f"{index:03d}_{path.stem}"  # the index keeps names unique across folders
        report.pictures.append(out / f"{stem}_attention.png")
        render_attention(image, all_maps[index, 0], image_size).save(report.pictures[-1])
        for register in range(1, all_maps.shape[1]) if registers else ():
            report.pictures.append(out / f"{stem}_reg{register - 1}.png")
            render_attention(image, all_maps[index, register], image_size).save(report.pictures[-1])
    return report
