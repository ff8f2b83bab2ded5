"""BEiT-style block masks on the patch grid, for the iBOT masked-patch loss.

A mask is built from random rectangles ("blocks") until it holds the requested number of patches. Each block has a
target area drawn uniformly in ``[min_num_patches, budget]`` (the budget being what is left, capped at
``max_num_patches``) and a log-uniform aspect ratio in ``[min_aspect, max_aspect]``; its sides are the rounded
``sqrt(area * aspect)`` x ``sqrt(area / aspect)``. A block is accepted when it lies strictly inside the grid and adds
between 1 and ``budget`` new patches; after 10 rejected draws in a row the mask is returned as it is (so a mask can
hold fewer patches than asked, never more). This is the algorithm of ``dinov2.data.masking.MaskingGenerator``; the
tests check that both produce the same statistics. Unlike the official class, the randomness comes from a
``numpy.random.Generator`` (seedable, picklable) rather than Python's global ``random`` module.

Consequences of the rounding that the official code shares: a block can cover 3 patches (a 1x3 strip from a target
area of 4), and the last block of a mask is drawn from what is left of the budget, so it can be smaller still.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MAX_TRIES_PER_BLOCK = 10  # the official value: draws before giving up on adding a block


@dataclass(frozen=True)
class MaskBlock:
    """A rectangle of patches: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


class MaskingGenerator:
    """Random block masks on a ``(rows, cols)`` patch grid.

    Args:
        grid_size: ``(rows, cols)`` of the patch grid (``(H // patch, W // patch)``), or one int for a square grid.
        min_num_patches: lower bound of a block's sampled target area (4 in DINOv2).
        max_num_patches: upper bound of one block's target area; ``None`` = half the grid, the value the official
            training script passes (``0.5 * rows * cols``).
        min_aspect: smallest height/width ratio of a block (0.3).
        max_aspect: largest ratio; ``None`` = ``1 / min_aspect``.
        seed: seed of the generator's own ``numpy.random.Generator`` (used when a call passes no ``rng``).

    Call it with the number of patches to mask: ``generator(40)`` -> ``np.ndarray[rows, cols]`` of bool.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ) -> None:
        rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        if rows < 1 or cols < 1:
            raise ValueError(f"grid_size must be positive (rows, cols), got {grid_size}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.rows, self.cols = int(rows), int(cols)
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.rows * self.cols if max_num_patches is None else max_num_patches
        if self.max_num_patches <= 0:
            raise ValueError(f"max_num_patches must be positive, got {max_num_patches}")
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.rng = np.random.default_rng(seed)

    @property
    def num_patches(self) -> int:
        """N, the number of patches of the grid."""
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect_range)
        return (
            f"MaskingGenerator(grid={self.rows}x{self.cols}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches:g}], aspect [{lo:.3g}, {hi:.3g}])"
        )

    def sample_block(self, budget: float, rng: np.random.Generator) -> MaskBlock | None:
        """One candidate block for a remaining budget of ``budget`` patches; None when it does not fit the grid."""
        # uniform(a, b) also for a > b (budget below min_num_patches), as Python's random.uniform does
        target_area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
        aspect = math.exp(
            self.log_aspect_range[0] + (self.log_aspect_range[1] - self.log_aspect_range[0]) * rng.random()
        )
        height = round(math.sqrt(target_area * aspect))
        width = round(math.sqrt(target_area / aspect))
        if not (height < self.rows and width < self.cols):
            return None
        top = int(rng.integers(0, self.rows - height + 1))
        left = int(rng.integers(0, self.cols - width + 1))
        return MaskBlock(top, left, height, width)

    def _add_block(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> int:
        """Add one block to ``mask`` in place; returns the number of newly masked patches (0 = gave up)."""
        for _ in range(_MAX_TRIES_PER_BLOCK):
            block = self.sample_block(budget, rng)
            if block is None:
                continue
            region = mask[block.top : block.top + block.height, block.left : block.left + block.width]
            new = region.size - int(region.sum())
            # a block must add something, and not more than the budget (overlap with earlier blocks counts)
            if 0 < new <= budget:
                region[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
        """A mask ``[rows, cols]`` (bool) with at most ``num_masking_patches`` patches set (usually exactly)."""
        if num_masking_patches > self.num_patches:
            raise ValueError(f"cannot mask {num_masking_patches} patches of a {self.rows}x{self.cols} grid")
        rng = self.rng if rng is None else rng
        mask = np.zeros((self.rows, self.cols), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask
