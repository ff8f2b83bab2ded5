"""Batching multi-crop samples and drawing the iBOT masks of the global crops.

Crops are stacked crop-major: global crop ``g`` of image ``b`` is row ``g * B + b`` (likewise for local crops), the
layout of the official ``collate_data_and_cast``. Of the ``G * B`` global crops, ``int(G * B *
mask_sample_probability)`` get a block mask; their mask ratios are stratified: ``[min, max]`` is split into as many
equal bins as masked crops and one ratio is drawn uniformly in each bin (``int(N * ratio)`` patches). The other
crops get an empty mask, and the masks are shuffled over the crops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinolab.data.datasets import TrainSample, sample_seed
from dinolab.data.masking import MaskingGenerator

MASK_STREAM = 1  # `stream` of sample_seed for the masks of a batch (0 is the crops of a sample)


@dataclass(eq=False)  # tensors have no single truth value: compare fields explicitly
class Batch:
    """A collated pretraining batch of ``B`` images with ``G`` global and ``L`` local crops each."""

    global_crops: Tensor  # [G*B, C, H, W] crop-major: global crop g of image b at row g*B + b
    local_crops: Tensor  # [L*B, C, h, w] crop-major ([0, C, h, w] when there are no local crops)
    masks: Tensor  # [G*B, N] bool patch masks of the global crops (N = (H/p)*(W/p), row-major patch order)
    mask_indices: Tensor  # [M] long: flat indices into masks.flatten() of the masked patches (ascending)
    mask_weights: Tensor  # [M] float: 1 / (number of masked patches of that patch's crop)
    num_images: int  # B
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files met while building the batch
    indices: Tensor | None = None  # [B] long dataset indices of the images (after skips)
    positions: Tensor | None = None  # [B] long global-stream positions of the samples (-1 where unknown)
    mask_upperbound: int = 0  # sum over the masked crops of int(N * upper edge of its ratio bin): a bound on M

    @property
    def num_global_crops(self) -> int:
        return self.global_crops.shape[0] // self.num_images

    @property
    def num_local_crops(self) -> int:
        return self.local_crops.shape[0] // self.num_images

    @property
    def masked_crops(self) -> Tensor:
        """``[G*B]`` bool: which global crops have at least one masked patch."""
        return self.masks.any(dim=1)

    @property
    def n_masked_images(self) -> int:
        """Number of global crops with a non-empty mask."""
        return int(self.masked_crops.sum())

    @property
    def n_masked_patches(self) -> int:
        """M, the number of masked patches over the whole batch."""
        return self.mask_indices.numel()

    def _map(self, fn: Any) -> Batch:
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if isinstance(v, Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda v: v.pin_memory() if isinstance(v, Tensor) else v)


def stratified_mask_counts(
    num_masked: int, num_patches: int, ratio_min_max: tuple[float, float], rng: np.random.Generator
) -> tuple[list[int], int]:
    """Masked-patch counts of ``num_masked`` crops, one ratio per equal bin of ``ratio_min_max``; and their bound.

    Returns ``(counts, upperbound)`` with ``counts[i] = int(N * U(edge_i, edge_i+1))`` and ``upperbound =
    sum_i int(N * edge_i+1)``.
    """
    edges = np.linspace(ratio_min_max[0], ratio_min_max[1], num_masked + 1)
    ratios = rng.uniform(edges[:-1], edges[1:])
    counts = [int(num_patches * r) for r in ratios]
    return counts, sum(int(num_patches * e) for e in edges[1:])


def _views_of(sample: Any) -> Any:
    return sample.views if isinstance(sample, TrainSample) else sample


def _crops(views: Any, key: str) -> list[Tensor]:
    # MultiCropViews, or the dict of the official augmentation ({"global_crops": [...], "local_crops": [...]})
    return list(views[key]) if isinstance(views, Mapping) else list(getattr(views, key))


def _stack_crops(views: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """Crop-major stacks ``[G*B, C, H, W]`` and ``[L*B, C, h, w]`` of the views of ``B`` images."""
    global_per_image = [_crops(v, "global_crops") for v in views]
    local_per_image = [_crops(v, "local_crops") for v in views]
    num_global, num_local = len(global_per_image[0]), len(local_per_image[0])
    if (
        num_global == 0
        or any(len(g) != num_global for g in global_per_image)
        or any(len(c) != num_local for c in local_per_image)
    ):
        raise ValueError("every sample must have the same (non-zero) number of global crops and of local crops")
    global_crops = torch.stack([crops[g] for g in range(num_global) for crops in global_per_image])
    if num_local:
        local_crops = torch.stack([crops[k] for k in range(num_local) for crops in local_per_image])
    else:
        side = getattr(views[0], "local_size", 0)  # MultiCropViews knows the size of the crops it did not make
        local_crops = global_crops.new_empty((0, global_crops.shape[1], side, side))
    return global_crops, local_crops


def collate_views(
    samples: Sequence[TrainSample],
    mask_generator: MaskingGenerator,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    rng: np.random.Generator | None = None,
) -> Batch:
    """Stack the crops of ``samples`` and draw the masks of their global crops (see the module docstring).

    ``samples`` are :class:`TrainSample` (or bare views). ``rng`` draws the ratios, the masks and their shuffle;
    ``None`` derives one from torch's global RNG (so ``torch.manual_seed`` and DataLoader worker seeding apply).
    """
    if not samples:
        raise ValueError("collate_views needs at least one sample")
    lo, hi = mask_ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}")
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    global_crops, local_crops = _stack_crops([_views_of(s) for s in samples])
    masks, upperbound = _draw_masks(
        global_crops.shape, mask_generator, mask_ratio_min_max, mask_sample_probability, rng
    )
    counts = masks.sum(dim=1)  # [G*B]
    mask_indices = masks.flatten().nonzero().flatten()  # [M], grouped by crop since the flattening is row-major
    mask_weights = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts)  # [M]

    trains = [s for s in samples if isinstance(s, TrainSample)]
    return Batch(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=masks,
        mask_indices=mask_indices,
        mask_weights=mask_weights,
        num_images=len(samples),
        skipped=[entry for s in trains for entry in s.skipped],
        indices=torch.tensor([s.index for s in trains], dtype=torch.long) if trains else None,
        positions=torch.tensor([-1 if s.position is None else s.position for s in trains], dtype=torch.long)
        if trains
        else None,
        mask_upperbound=upperbound,
    )


def _draw_masks(
    crops_shape: torch.Size,
    mask_generator: MaskingGenerator,
    ratio_min_max: tuple[float, float],
    sample_probability: float,
    rng: np.random.Generator,
) -> tuple[Tensor, int]:
    num_crops, _, height, width = crops_shape
    rows, cols = mask_generator.shape
    if height % rows or width % cols or height // rows != width // cols:
        raise ValueError(
            f"global crops of {height}x{width} px do not split into the mask generator's {rows}x{cols} grid of "
            "square patches: build the MaskingGenerator with (global_size // patch_size,) * 2"
        )
    num_patches = mask_generator.num_patches
    num_masked = int(num_crops * sample_probability)
    counts, upperbound = stratified_mask_counts(num_masked, num_patches, ratio_min_max, rng)
    masks = np.zeros((num_crops, num_patches), dtype=bool)
    for i, count in enumerate(counts):
        masks[i] = mask_generator(count, rng=rng).reshape(-1)
    masks = masks[rng.permutation(num_crops)]  # the masked crops land anywhere in the batch
    return torch.from_numpy(masks), upperbound


class MultiCropCollate:
    """Picklable collate function for a DataLoader: ``samples -> Batch`` with the masks of :func:`collate_views`.

    When the samples come from :class:`~dinolab.data.samplers.InfiniteSampler` (they carry a stream position),
    the masks are seeded from (stream seed, position of the batch's first sample): a resumed run draws the same
    masks. Otherwise they come from torch's global RNG (seeded per worker by the DataLoader).
    """

    def __init__(
        self,
        mask_generator: MaskingGenerator,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
    ) -> None:
        self.mask_generator = mask_generator
        self.mask_ratio_min_max = tuple(mask_ratio_min_max)
        self.mask_sample_probability = mask_sample_probability

    def __call__(self, samples: Sequence[TrainSample]) -> Batch:
        first = samples[0] if samples else None
        rng = None
        if isinstance(first, TrainSample) and first.position is not None and first.seed is not None:
            rng = np.random.default_rng(sample_seed(first.seed, first.position, MASK_STREAM))
        return collate_views(samples, self.mask_generator, self.mask_ratio_min_max, self.mask_sample_probability, rng)
