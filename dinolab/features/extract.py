"""Batched feature extraction with a frozen backbone: the loop shared by embedding, evaluation and curation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from dinolab.data.images import ImageBatch, collate_loaded
from dinolab.runtime import autocast_context, resolve_device

# model, images [B, C, H, W] -> named features, each [B, ...]
FeatureFn = Callable[[nn.Module, Tensor], dict[str, Tensor]]


def cls_features(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The normalised CLS token, ``[B, D]``."""
    return {"cls": model(images)}


@dataclass
class Extracted:
    """Features of the readable images, in dataset order, and the images that could not be read."""

    indices: np.ndarray  # [N] dataset indices that have features
    features: dict[str, np.ndarray]  # name -> [N, ...] float32
    failures: list[tuple[int, str]] = field(default_factory=list)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    feature_fn: FeatureFn = cls_features,
    batch_size: int = 64,
    num_workers: int = 2,
    dtype: str = "fp32",
    device: torch.device | str | None = None,
    progress: bool = True,
    description: str = "embedding",
    distributed: bool = False,
) -> Extracted:
    """Run ``feature_fn`` over a dataset of :class:`~dinolab.data.images.LoadedImage` items.

    Unreadable images are collected in ``failures``; everything else comes back as float32 numpy arrays. With
    ``distributed`` (under torchrun), each process embeds every ``world_size``-th item and every process gets
    the whole result back, in dataset order.
    """
    device = resolve_device(device)
    model = model.to(device).eval()
    world = dist.get_world_size() if distributed and dist.is_initialized() else 1
    if world > 1:
        dataset = Subset(dataset, range(dist.get_rank(), len(dataset), world))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_loaded,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    indices: list[Tensor] = []
    chunks: dict[str, list[np.ndarray]] = {}
    failures: list[tuple[int, str]] = []
    batch: ImageBatch
    for batch in tqdm(loader, desc=description, disable=not progress, unit="batch"):
        failures.extend(batch.failures)
        if batch.images is None:
            continue
        with autocast_context(device, dtype):
            outputs = feature_fn(model, batch.images.to(device, non_blocking=True))
        for name, value in outputs.items():
            chunks.setdefault(name, []).append(value.float().cpu().numpy())
        indices.append(batch.indices)
    features = {name: np.concatenate(parts) for name, parts in chunks.items()}
    all_indices = torch.cat(indices).numpy() if indices else np.zeros(0, dtype=np.int64)
    result = Extracted(all_indices, features, failures)
    return _gather(result) if world > 1 else result


def _gather(local: Extracted) -> Extracted:
    """Every process's share, merged on every process and put back in dataset order."""
    shares: list[Extracted | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    indices = np.concatenate([share.indices for share in shares])
    order = np.argsort(indices, kind="stable")
    names = next((share.features.keys() for share in shares if share.features), ())
    features = {name: np.concatenate([s.features[name] for s in shares if name in s.features])[order] for name in names}
    failures = sorted(failure for share in shares for failure in share.failures)
    return Extracted(indices[order], features, failures)
