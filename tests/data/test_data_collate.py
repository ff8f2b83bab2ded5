"""Collation and iBOT masking must match the official ``dinov2.data.collate.collate_data_and_cast``."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator as OfficialMaskingGenerator

from dinolab.data import Batch, MaskingGenerator, MultiCropCollate, MultiCropViews, TrainSample, collate_views

GRID = 8  # 8x8 patches of 4 px on 32 px global crops
N = GRID * GRID


def _samples(num_images: int, num_local: int = 3, seed: int = 0) -> list[TrainSample]:
    g = torch.Generator().manual_seed(seed)
    return [
        TrainSample(
            views=MultiCropViews(
                global_crops=[torch.randn(3, 32, 32, generator=g) for _ in range(2)],
                local_crops=[torch.randn(3, 16, 16, generator=g) for _ in range(num_local)],
                local_size=16,
            ),
            index=i,
            skipped=[(f"bad{i}.jpg", "OSError: broken")] if i == 1 else [],
        )
        for i in range(num_images)
    ]


def _official(samples: list[TrainSample], probability: float = 0.5) -> dict:
    as_official = [({"global_crops": s.views.global_crops, "local_crops": s.views.local_crops}, None) for s in samples]
    generator = OfficialMaskingGenerator((GRID, GRID), max_num_patches=0.5 * N)
    return collate_data_and_cast(as_official, (0.1, 0.5), probability, torch.float32, N, generator)


def _check_mask_bookkeeping(masks: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    """Indices and weights against a naive loop over the masks."""
    expected_indices, expected_weights = [], []
    for crop in range(masks.shape[0]):
        count = int(masks[crop].sum())
        for patch in range(masks.shape[1]):
            if masks[crop, patch]:
                expected_indices.append(crop * masks.shape[1] + patch)
                expected_weights.append(1.0 / count)
    assert indices.tolist() == expected_indices
    torch.testing.assert_close(weights, torch.tensor(expected_weights, dtype=weights.dtype))


def test_structure_matches_official() -> None:
    samples = _samples(5)
    random.seed(0)
    ref = _official(samples)
    ours = collate_views(samples, MaskingGenerator(GRID), rng=np.random.default_rng(0))
    assert isinstance(ours, Batch)
    # crop-major stacking: global crop g of image b at row g * B + b, exactly as the official collate
    assert torch.equal(ours.global_crops, ref["collated_global_crops"])
    assert torch.equal(ours.local_crops, ref["collated_local_crops"])
    assert torch.equal(ours.global_crops[1 * 5 + 3], samples[3].views.global_crops[1])
    assert ours.masks.shape == ref["collated_masks"].shape == (10, N) and ours.masks.dtype == torch.bool
    assert (ours.num_images, ours.num_global_crops, ours.num_local_crops) == (5, 2, 3)
    # the same number of masked crops, int(G * B * p) = 5
    assert ours.n_masked_images == int(ref["collated_masks"].any(1).sum()) == 5
    # both follow the same bookkeeping of indices and weights (the official weights formula, applied to our masks)
    _check_mask_bookkeeping(ref["collated_masks"], ref["mask_indices_list"], ref["masks_weight"])
    _check_mask_bookkeeping(ours.masks, ours.mask_indices, ours.mask_weights)
    official_formula = (1 / ours.masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(ours.masks)[ours.masks]
    torch.testing.assert_close(ours.mask_weights, official_formula)
    assert ours.n_masked_patches == ours.mask_indices.numel() <= ours.mask_upperbound
    # the weights of each masked crop sum to 1 (the iBOT loss averages per image)
    per_crop = torch.zeros(10).index_add_(0, ours.mask_indices // N, ours.mask_weights)
    torch.testing.assert_close(per_crop, ours.masked_crops.float())
    assert ours.skipped == [("bad1.jpg", "OSError: broken")]
    assert ours.indices.tolist() == [0, 1, 2, 3, 4]


def _masked_counts_by_rank(masks: torch.Tensor) -> np.ndarray:
    counts = masks.sum(1).numpy()
    return np.sort(counts[counts > 0])


def test_ratios_are_stratified() -> None:
    """With 8 masked crops of 64 patches, the i-th smallest mask lies in the i-th of 8 bins of [0.1, 0.5]."""
    edges = np.linspace(0.1, 0.5, 9)
    rng = np.random.default_rng(1)
    generator = MaskingGenerator(GRID)
    for _ in range(30):
        batch = collate_views(_samples(8, num_local=0), generator, rng=rng)
        counts = batch.masks.sum(1).numpy()
        assert (counts > 0).sum() == 8
        ranked = np.sort(counts[counts > 0])
        # the block generator may stop a patch or two short of int(N * ratio), never above it
        assert (ranked <= np.floor(N * edges[1:])).all()
        assert (ranked >= np.floor(N * edges[:-1]) - 2).all()


def test_mask_count_statistics_match_official() -> None:
    """Mean masked count of the i-th smallest mask, over many batches, agrees with the official collate."""
    random.seed(0)
    rng = np.random.default_rng(0)
    generator = MaskingGenerator(GRID)
    samples = _samples(6, num_local=1)  # the official collate cannot stack zero local crops
    ref = np.stack([_masked_counts_by_rank(_official(samples)["collated_masks"]) for _ in range(150)])  # [S, 6]
    our = np.stack([_masked_counts_by_rank(collate_views(samples, generator, rng=rng).masks) for _ in range(150)])
    se = np.sqrt(ref.var(0) / len(ref) + our.var(0) / len(our)) + 1e-9
    assert (np.abs(ref.mean(0) - our.mean(0)) / se < 4.5).all(), (ref.mean(0), our.mean(0))


def test_masked_crops_are_shuffled() -> None:
    rng = np.random.default_rng(2)
    generator = MaskingGenerator(GRID)
    hits = torch.stack([collate_views(_samples(6, 0), generator, rng=rng).masked_crops for _ in range(60)])
    frequency = hits.float().mean(0)  # [G*B], expected 0.5 everywhere
    assert ((frequency > 0.2) & (frequency < 0.8)).all(), frequency


def test_no_local_crops_and_no_masks() -> None:
    batch = collate_views(_samples(3, num_local=0), MaskingGenerator(GRID), mask_sample_probability=0.0)
    assert batch.local_crops.shape == (0, 3, 16, 16) and batch.num_local_crops == 0
    assert not batch.masks.any() and batch.mask_indices.numel() == 0 and batch.mask_weights.numel() == 0


def test_rejects_mismatched_grid_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="grid"):
        collate_views(_samples(2), MaskingGenerator((8, 6)))
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        collate_views(_samples(2), MaskingGenerator(GRID), mask_ratio_min_max=(0.5, 0.1))
    with pytest.raises(ValueError, match="at least one sample"):
        collate_views([], MaskingGenerator(GRID))


def test_collate_callable_is_picklable_and_seeded_by_stream_position() -> None:
    collate = pickle.loads(pickle.dumps(MultiCropCollate(MaskingGenerator(GRID), (0.1, 0.5), 0.5)))

    def at(position: int) -> list[TrainSample]:
        samples = _samples(4)
        for k, s in enumerate(samples):
            s.position, s.seed = position + k, 0
        return samples

    assert torch.equal(collate(at(100)).masks, collate(at(100)).masks)
    assert not all(torch.equal(collate(at(100)).masks, collate(at(p)).masks) for p in (104, 108, 112))
    assert collate(at(100)).positions.tolist() == [100, 101, 102, 103]


def test_batch_to_moves_every_tensor() -> None:
    batch = collate_views(_samples(2), MaskingGenerator(GRID), rng=np.random.default_rng(0))
    moved = batch.to("meta")
    for name in ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "indices", "positions"):
        assert getattr(moved, name).device.type == "meta", name
    assert moved.num_images == 2 and moved.skipped == batch.skipped
