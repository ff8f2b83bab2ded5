"""Retrieval of pool images close to curated seed sets (DINOv2's LVD-142M recipe).

* sample-based (large seed sets): the ``n`` nearest pool images of every seed image (n = 4 in the paper);
* cluster-based (small seed sets): k-means the pool, then take ``m`` images from the cluster of every seed
  image (the ``m`` closest to the seed, or ``m`` at random). Every concept a seed stands for contributes the
  same number of images however large its cluster, which rebalances over-represented modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinolab.curation.arrays import ArrayLike, gather
from dinolab.curation.index import DEFAULT_INDEX, IndexConfig, knn
from dinolab.curation.kmeans import DEFAULT_KMEANS, KMeansConfig, assign, kmeans


@dataclass
class Retrieval:
    """Pool rows retrieved for the seeds."""

    neighbors: np.ndarray
    """int64 ``[S, n]``: pool rows picked for each seed, best first (-1 pads when fewer exist)."""
    similarity: np.ndarray
    """float32 ``[S, n]``: their cosine similarity to the seed (-inf pads)."""
    pool_cluster: np.ndarray | None = None
    """int64 ``[P]``: cluster of every pool row (cluster-based retrieval only)."""
    seed_cluster: np.ndarray | None = None
    """int64 ``[S]``: cluster of every seed (cluster-based retrieval only)."""

    @property
    def selected(self) -> np.ndarray:
        """Distinct retrieved pool rows, sorted."""
        return np.unique(self.neighbors[self.neighbors >= 0])

    def best_seed(self, num_pool: int) -> tuple[np.ndarray, np.ndarray]:
        """For every pool row ``[P]``: its highest similarity to a seed that retrieved it, and that seed
        (``-inf`` / ``-1`` for rows no seed retrieved)."""
        seed = np.repeat(np.arange(len(self.neighbors)), self.neighbors.shape[1])
        rows, sims = self.neighbors.ravel(), self.similarity.ravel()
        valid = rows >= 0
        rows, sims, seed = rows[valid], sims[valid], seed[valid]
        order = np.lexsort((-sims, rows))  # by row, best similarity first
        first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
        best = np.full(num_pool, -np.inf, dtype=np.float32)
        best_seed = np.full(num_pool, -1, dtype=np.int64)
        best[rows[first]], best_seed[rows[first]] = sims[first], seed[first]
        return best, best_seed


def retrieve_nearest(
    pool: ArrayLike, seeds: ArrayLike, n: int = 4, config: IndexConfig = DEFAULT_INDEX, batch_size: int = 16_384
) -> Retrieval:
    """The ``n`` most similar pool rows of every seed row (exact scores; the index may be approximate)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_dims(pool, seeds)
    scores, ids = knn(seeds, pool, n, config, batch_size)
    if ids.shape[1] < n:  # pool smaller than n
        pad = n - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return Retrieval(ids, scores)


def retrieve_by_cluster(
    pool: ArrayLike,
    seeds: ArrayLike,
    num_clusters: int,
    m: int,
    pick: str = "nearest",
    config: KMeansConfig = DEFAULT_KMEANS,
) -> Retrieval:
    """k-means the pool into ``num_clusters``; for each seed take ``m`` rows of the cluster it falls in.

    ``pick``: ``nearest`` (the ``m`` cluster members most similar to the seed) or ``random``.
    """
    if pick not in ("nearest", "random"):
        raise ValueError(f"pick must be 'nearest' or 'random', got {pick!r}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    _check_dims(pool, seeds)
    clustering = kmeans(pool, num_clusters, config)
    seed_cluster, _ = assign(seeds, clustering.centroids, config.batch_size)
    order = np.argsort(clustering.assignment, kind="stable")
    bounds = np.searchsorted(clustering.assignment[order], np.arange(num_clusters + 1))
    rng = np.random.default_rng(config.seed)
    neighbors = np.full((len(seeds), m), -1, dtype=np.int64)
    similarity = np.full((len(seeds), m), -np.inf, dtype=np.float32)
    for cluster in np.unique(seed_cluster):
        members = order[bounds[cluster] : bounds[cluster + 1]]
        member_x = gather(pool, members)  # [C, D]
        for s in np.nonzero(seed_cluster == cluster)[0]:
            sims = member_x @ gather(seeds, [s])[0]  # [C]
            if pick == "nearest":
                top = np.argsort(-sims, kind="stable")[:m]
            else:
                top = rng.choice(len(members), min(m, len(members)), replace=False)
            neighbors[s, : len(top)] = members[top]
            similarity[s, : len(top)] = sims[top]
    return Retrieval(neighbors, similarity, clustering.assignment, seed_cluster)


def _check_dims(pool: ArrayLike, seeds: ArrayLike) -> None:
    if pool.shape[1] != seeds.shape[1]:
        raise ValueError(
            f"seed embeddings are {seeds.shape[1]}-d but the pool's are {pool.shape[1]}-d; embed both with the same model"
        )
    if len(pool) == 0 or len(seeds) == 0:
        raise ValueError("retrieval needs a non-empty pool and at least one seed")
