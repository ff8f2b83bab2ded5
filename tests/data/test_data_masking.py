"""Block masks must follow the statistics of the official ``dinov2.data.masking.MaskingGenerator``."""

from __future__ import annotations

import random

import numpy as np
import pytest
from dinov2.data.masking import MaskingGenerator as OfficialMaskingGenerator

from dinolab.data.masking import MaskingGenerator

GRID = (8, 12)  # not square, so that swapped rows/cols would show
MAX_BLOCK = 48  # half the grid, the value the official training script passes


def _bounding_box(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.where(mask.any(axis=1))[0], np.where(mask.any(axis=0))[0]
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask.sum() == height * width, "a single block must be a filled rectangle"
    return height, width


def _z(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample z statistic of the difference of the means."""
    se = np.sqrt(a.var() / len(a) + b.var() / len(b))
    return abs(a.mean() - b.mean()) / max(se, 1e-12)


def test_single_blocks_match_official_distribution() -> None:
    random.seed(0)  # the official generator draws from Python's global RNG
    official = OfficialMaskingGenerator(GRID, max_num_patches=MAX_BLOCK)
    ours = MaskingGenerator(GRID, seed=0)
    assert ours.max_num_patches == MAX_BLOCK
    ref_blocks, our_blocks = [], []
    for _ in range(2000):
        mask = np.zeros(GRID, dtype=bool)
        official._mask(mask, MAX_BLOCK)
        ref_blocks.append(_bounding_box(mask))
        mask = np.zeros(GRID, dtype=bool)
        ours._add_block(mask, MAX_BLOCK, ours.rng)
        our_blocks.append(_bounding_box(mask))
    ref, our = np.array(ref_blocks), np.array(our_blocks)  # [S, 2] (height, width)

    # blocks lie strictly inside the grid (the official rule: h < rows, w < cols) and are at least 3 patches
    # (a target area >= 4 rounded to e.g. 1x3)
    assert (our[:, 0] < GRID[0]).all() and (our[:, 1] < GRID[1]).all()
    assert (our.prod(axis=1) >= 3).all() and (our.prod(axis=1) <= MAX_BLOCK + 4).all()
    for name, stat in {
        "height": lambda x: x[:, 0],
        "width": lambda x: x[:, 1],
        "area": lambda x: x.prod(axis=1),
        "log aspect": lambda x: np.log(x[:, 0] / x[:, 1]),
        "area < 4": lambda x: (x.prod(axis=1) < 4).astype(float),
    }.items():
        assert _z(stat(our).astype(float), stat(ref).astype(float)) < 4.5, name
    # log-uniform aspect ratio in [0.3, 1/0.3]: both orientations occur, up to the rounding of the sides
    aspect = our[:, 0] / our[:, 1]
    assert aspect.min() <= 0.34 and aspect.max() >= 2.9
    assert ((aspect >= 0.3 * 0.5) & (aspect <= 2 / 0.3)).all()


@pytest.mark.parametrize("target", [0, 5, 19, 38, 48])
def test_mask_counts_match_official(target: int) -> None:
    random.seed(target)
    official = OfficialMaskingGenerator(GRID, max_num_patches=MAX_BLOCK)
    ours = MaskingGenerator(GRID, seed=target)
    ref = np.array([official(target).sum() for _ in range(150)])
    our_masks = np.stack([ours(target) for _ in range(150)])  # [S, rows, cols]
    assert our_masks.shape[1:] == GRID and our_masks.dtype == bool
    our = our_masks.sum(axis=(1, 2))
    assert (our <= target).all(), "a mask never holds more patches than asked"
    assert our.mean() >= 0.97 * target  # the target is reached almost always
    assert abs(our.mean() - ref.mean()) <= 0.05 * target + 0.1


def test_small_budget_blocks_and_full_coverage() -> None:
    ours = MaskingGenerator(4, max_num_patches=16, seed=1)
    # a budget below min_num_patches still gets filled (the last blocks shrink to what remains)
    assert all(ours(count).sum() == count for count in (1, 2, 3))
    # asking for more patches than the grid has is an error, not a silent clip
    with pytest.raises(ValueError, match="cannot mask"):
        ours(17)


def test_seeding_is_reproducible() -> None:
    a, b = MaskingGenerator(GRID, seed=3), MaskingGenerator(GRID, seed=3)
    assert all((a(30) == b(30)).all() for _ in range(5))
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert (a(30, rng=rng1) == b(30, rng=rng2)).all()
    assert not all((a(30) == a(30)).all() for _ in range(5))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="grid_size"):
        MaskingGenerator((0, 4))
    with pytest.raises(ValueError, match="aspect"):
        MaskingGenerator(4, min_aspect=2.0, max_aspect=1.0)
