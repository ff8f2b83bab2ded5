"""Near-duplicate removal: k-NN graph under cosine similarity, one image kept per connected component.

Reference semantics (the unit test checks a brute-force version of this):
    edges = {(i, j) : i != j, j among the k nearest neighbours of i, cos(x_i, x_j) >= threshold}
    components = connected components of the undirected graph (rows, edges)
    keep the lowest row number of every component; every other row is dropped, its twin being that row

Keeping the lowest row is deterministic and, with inputs listed in a stable order, keeps the first copy met.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinolab.curation.arrays import ArrayLike, gather
from dinolab.curation.index import DEFAULT_INDEX, IndexConfig, build_index, exact_scores, is_exact, search


@dataclass
class DedupResult:
    """Per row of the pool ``[N]``."""

    keep: np.ndarray
    """bool: the row is kept (it is its component's representative)."""
    twin: np.ndarray
    """int64: the kept row of the row's component (itself when kept)."""
    similarity: np.ndarray
    """float32: cosine similarity to ``twin`` (1 for kept rows)."""
    component: np.ndarray
    """int64: connected-component label."""
    pair_similarities: np.ndarray
    """float32: similarities of all k-NN pairs found (for the similarity histogram), self-pairs excluded."""

    @property
    def num_removed(self) -> int:
        return int((~self.keep).sum())


def duplicate_edges(
    x: ArrayLike, threshold: float, k: int, config: IndexConfig, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN pairs ``(i, j)`` with ``cos >= threshold`` (exact scores) and all k-NN scores, self-pairs excluded."""
    index = build_index(x, config)
    exact = is_exact(index)
    src, dst, all_scores = [], [], []
    for start, scores, ids in search(index, x, k + 1, batch_size):  # +1: each row finds itself
        if not exact:  # approximate scores may cross the threshold either way; decide on exact ones
            scores = exact_scores(np.ascontiguousarray(x[start : start + len(ids)], dtype=np.float32), x, ids)
        rows = np.arange(start, start + len(ids))[:, None]
        other = (ids >= 0) & (ids != rows)
        all_scores.append(scores[other])
        hit = other & (scores >= threshold)
        src.append(np.broadcast_to(rows, ids.shape)[hit])
        dst.append(ids[hit])
    return np.concatenate(src), np.concatenate(dst), np.concatenate(all_scores).astype(np.float32)


def deduplicate(
    x: ArrayLike,
    threshold: float = 0.95,
    k: int = 16,
    config: IndexConfig = DEFAULT_INDEX,
    batch_size: int = 16_384,
) -> DedupResult:
    """Find near-duplicate groups in ``x [N, D]`` (L2-normalised rows) and keep one row of each.

    ``k`` bounds the neighbours examined per row; larger groups are still joined through chains of pairs.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(x)
    src, dst, pair_scores = duplicate_edges(x, threshold, k, config, batch_size)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))  # lowest row of each component
    twin = first[labels]
    keep = twin == np.arange(n)
    similarity = np.ones(n, dtype=np.float32)
    removed = np.nonzero(~keep)[0]
    for start in range(0, len(removed), batch_size):
        part = removed[start : start + batch_size]
        similarity[part] = np.einsum("bd,bd->b", gather(x, part), gather(x, twin[part]))
    return DedupResult(keep, twin, similarity, labels.astype(np.int64), pair_scores)
