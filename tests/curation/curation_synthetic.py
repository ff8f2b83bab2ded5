"""Generated embeddings with planted structure, and brute-force references, for the curation tests."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def perturb(x: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at cosine ~ 1 / sqrt(1 + scale^2) from the unit rows of ``x``."""
    noise = rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])  # norm ~ 1
    return unit(x + scale * noise)


def planted_duplicates(
    num_unique: int, num_copies: int, num_near_misses: int, dim: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random unit rows, then ``num_copies`` near-duplicates (cos ~ 0.99) of random earlier rows and
    ``num_near_misses`` similar-but-not-duplicate rows (cos ~ 0.86), shuffled after the originals.

    Returns ``x [N, D]`` and ``original [N]``: for a planted copy, the row it copies (else -1).
    """
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((num_unique, dim)))
    src = rng.integers(0, num_unique, num_copies)
    copies = perturb(base[src], 0.12, rng)
    misses = perturb(base[rng.integers(0, num_unique, num_near_misses)], 0.6, rng)
    extra = np.concatenate([copies, misses])
    original = np.concatenate([src, np.full(num_near_misses, -1)])
    order = rng.permutation(len(extra))
    x = np.concatenate([base, extra[order]])
    return x, np.concatenate([np.full(num_unique, -1), original[order]])


def brute_force_dedup(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over every pair with cos >= threshold; keep the lowest row. Returns (keep, twin)."""
    n = len(x)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    sims = x @ x.T
    for i in range(n):
        for j in range(i + 1, n):
            if sims[i, j] >= threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)  # the root stays the lowest row
    twin = np.array([root(i) for i in range(n)])
    return twin == np.arange(n), twin


def blobs(sizes: list[int], dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows around ``len(sizes)`` random well-separated concept centres. Returns (x, concept)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((len(sizes), dim)))
    concept = np.repeat(np.arange(len(sizes)), sizes)
    return perturb(centres[concept], spread, rng), concept
