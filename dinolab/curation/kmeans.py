"""k-means (Faiss), hierarchical k-means and balanced sampling from the cluster tree (Vo et al. 2024).

Hierarchical k-means (arXiv 2405.15613): level 1 clusters the data points into ``k_1`` clusters, level
``l > 1`` clusters the ``k_{l-1}`` centroids of level ``l-1`` into ``k_l`` clusters, giving a tree whose
leaves are the level-1 clusters. Optional resampling refinement, per level: take the ``s`` members of each
cluster closest to its centroid, re-run k-means on that more uniform sample (from the current centroids)
and re-assign every point; this pulls centroids out of dense regions towards an even cover of the data.

Balanced sampling allots the target count evenly across the top-level clusters by water-filling (a cluster
smaller than its share gives all its points; the leftover is split among the others), then recursively
across each cluster's children, down to the leaves, where points are picked nearest to the centroid first
or at random.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
from sklearn.cluster import kmeans_plusplus

from dinolab.curation.arrays import ArrayLike, gather, iter_batches
from dinolab.curation.index import sample_rows


@dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    """Faiss k-means options."""

    niter: int = 20
    """Lloyd iterations."""
    max_points_per_centroid: int = 256
    """Training uses at most ``k * max_points_per_centroid`` sampled rows; every row is then assigned."""
    spherical: bool = False
    """Normalise centroids after each iteration (cosine k-means)."""
    init: str = "auto"
    """Initial centroids: ``kmeans++`` (scikit-learn's k-means++ seeding of the training sample, as Vo et al.),
    ``random`` (Faiss: random training rows) or ``auto``: k-means++ when the training sample has at most
    ``kmeanspp_max_rows`` rows (small pools and the upper levels of a tree, where a poor start merges whole
    concepts), random beyond (k-means++ costs ``k`` passes over the sample)."""
    kmeanspp_max_rows: int = 50_000
    seed: int = 0
    batch_size: int = 65_536
    """Rows assigned at a time."""
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.niter < 1 or self.max_points_per_centroid < 1:
            raise ValueError("k-means needs niter >= 1 and max_points_per_centroid >= 1")
        if self.init not in ("auto", "kmeans++", "random"):
            raise ValueError(f"k-means init must be 'auto', 'kmeans++' or 'random', got {self.init!r}")


DEFAULT_KMEANS = KMeansConfig()


@dataclass
class KMeansResult:
    centroids: np.ndarray
    """float32 ``[K, D]``."""
    assignment: np.ndarray
    """int64 ``[N]``: nearest centroid (squared L2) of each row."""
    distance: np.ndarray
    """float32 ``[N]``: squared L2 distance to it."""

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=len(self.centroids))


def assign(x: ArrayLike, centroids: np.ndarray, batch_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every row of ``x``: ``(assignment [N], distance [N])``."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    assignment = np.empty(len(x), dtype=np.int64)
    distance = np.empty(len(x), dtype=np.float32)
    for start, batch in iter_batches(x, batch_size):
        d, i = index.search(batch, 1)
        assignment[start : start + len(batch)] = i[:, 0]
        distance[start : start + len(batch)] = d[:, 0]
    return assignment, distance


def kmeans(
    x: ArrayLike, k: int, config: KMeansConfig = DEFAULT_KMEANS, init_centroids: np.ndarray | None = None
) -> KMeansResult:
    """k-means of the rows of ``x [N, D]`` trained on a sample, then every row assigned (in batches)."""
    n, dim = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of rows, got k={k} for {n} rows")
    train = gather(x, sample_rows(n, k * config.max_points_per_centroid, config.seed))
    km = faiss.Kmeans(
        dim,
        k,
        niter=config.niter,
        seed=config.seed,
        spherical=config.spherical,
        max_points_per_centroid=config.max_points_per_centroid,
        min_points_per_centroid=1,  # few points per centroid is a choice here (upper levels), not an error
        verbose=config.verbose,
    )
    use_kmeanspp = config.init == "kmeans++" or (config.init == "auto" and len(train) <= config.kmeanspp_max_rows)
    if init_centroids is None and use_kmeanspp:
        init_centroids, _ = kmeans_plusplus(train, k, random_state=config.seed)
    km.train(train, init_centroids=init_centroids)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    assignment, distance = assign(x, centroids, config.batch_size)
    return KMeansResult(centroids, assignment, distance)


def resample_refine(
    x: ArrayLike, result: KMeansResult, sample_size: int, steps: int, config: KMeansConfig
) -> KMeansResult:
    """``steps`` resampling-clustering refinements: a fresh k-means on the ``sample_size`` points closest to
    each centroid (an even share of every cluster, so dense regions no longer dominate), then every point
    re-assigned to the new centroids."""
    k = len(result.centroids)
    for step in range(steps):
        order = np.lexsort((result.distance, result.assignment))  # by cluster, then closest first
        rank = np.arange(len(order)) - np.searchsorted(result.assignment[order], result.assignment[order])
        sample = np.sort(order[rank < sample_size])
        if len(sample) < k:  # too few points to keep k clusters
            break
        step_config = KMeansConfig(**{**config.__dict__, "seed": config.seed + step + 1})
        refined = kmeans(gather(x, sample), k, step_config)
        assignment, distance = assign(x, refined.centroids, config.batch_size)
        result = KMeansResult(refined.centroids, assignment, distance)
    return result


@dataclass
class ClusterTree:
    """Hierarchical k-means: ``levels[0]`` clusters the points, ``levels[l]`` the centroids of ``levels[l-1]``."""

    levels: list[KMeansResult]

    def point_clusters(self, level: int) -> np.ndarray:
        """The level-``level`` cluster of every point ``[N]`` (0 = leaves)."""
        labels = self.levels[0].assignment
        for upper in self.levels[1 : level + 1]:
            labels = upper.assignment[labels]
        return labels

    def sizes(self, level: int) -> np.ndarray:
        """Number of points under each cluster of a level."""
        return np.bincount(self.point_clusters(level), minlength=len(self.levels[level].centroids))

    def children(self, level: int) -> list[np.ndarray]:
        """For each cluster of ``level`` >= 1, its child clusters at ``level - 1``."""
        parent = self.levels[level].assignment
        order = np.argsort(parent, kind="stable")
        bounds = np.searchsorted(parent[order], np.arange(len(self.levels[level].centroids) + 1))
        return [order[bounds[c] : bounds[c + 1]] for c in range(len(bounds) - 1)]


def hierarchical_kmeans(
    x: ArrayLike,
    clusters: Sequence[int],
    config: KMeansConfig = DEFAULT_KMEANS,
    resampling_steps: Sequence[int] | int = 0,
    sample_sizes: Sequence[int] | None = None,
) -> ClusterTree:
    """Build the tree with ``clusters[l]`` clusters at level ``l`` (e.g. ``(1000, 100, 10)``: decreasing).

    ``resampling_steps`` / ``sample_sizes``: per level (or one value for every level) refinement steps and
    points kept per cluster; the default sample size is half the level's average cluster size (at least 1).
    """
    clusters = list(clusters)
    if not clusters or any(b > a for a, b in itertools.pairwise(clusters)):
        raise ValueError(f"clusters per level must be non-empty and non-increasing (e.g. 1000,100,10), got {clusters}")
    steps = [resampling_steps] * len(clusters) if isinstance(resampling_steps, int) else list(resampling_steps)
    if len(steps) != len(clusters) or (sample_sizes is not None and len(sample_sizes) != len(clusters)):
        raise ValueError("give one resampling_steps / sample_sizes value per level")
    levels: list[KMeansResult] = []
    data: ArrayLike = x
    for level, k in enumerate(clusters):
        level_config = KMeansConfig(**{**config.__dict__, "seed": config.seed + 1000 * level})
        result = kmeans(data, k, level_config)
        if steps[level] > 0:
            size = sample_sizes[level] if sample_sizes is not None else max(1, len(data) // (2 * k))
            result = resample_refine(data, result, size, steps[level], level_config)
        levels.append(result)
        data = result.centroids
    return ClusterTree(levels)


def allot(sizes: np.ndarray, target: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Split ``target`` over groups of ``sizes`` as evenly as possible without exceeding any group.

    Water-filling: the largest cap ``c`` with ``sum(min(sizes, c)) <= target`` is given to every group
    (small groups give everything), and the ``< #groups`` leftover units go one each to groups still above
    ``c`` (chosen at random with ``rng``, else the largest first). Returns counts ``[G]`` summing to
    ``min(target, sizes.sum())``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    if target >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # sum(min(sizes, lo)) <= target < sum(min(sizes, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    counts = np.minimum(sizes, lo)
    leftover = int(target - counts.sum())
    open_groups = np.nonzero(sizes > lo)[0]
    if rng is not None:
        extra = rng.choice(open_groups, leftover, replace=False)
    else:
        extra = open_groups[np.argsort(-sizes[open_groups], kind="stable")[:leftover]]
    counts[extra] += 1
    return counts


def balanced_sample(tree: ClusterTree, target: int, pick: str = "nearest", seed: int = 0) -> np.ndarray:
    """``min(target, N)`` point rows sampled evenly down the cluster tree (sorted).

    ``pick``: ``nearest`` takes the points closest to their leaf centroid first, ``random`` draws at random.
    """
    if pick not in ("nearest", "random"):
        raise ValueError(f"pick must be 'nearest' or 'random', got {pick!r}")
    rng = np.random.default_rng(seed)
    leaves = tree.levels[0]
    # members of each leaf, closest to the centroid first
    order = np.lexsort((leaves.distance, leaves.assignment))
    bounds = np.searchsorted(leaves.assignment[order], np.arange(len(leaves.centroids) + 1))
    sizes = [tree.sizes(level) for level in range(len(tree.levels))]
    children = [None] + [tree.children(level) for level in range(1, len(tree.levels))]

    picked: list[np.ndarray] = []

    def take(level: int, cluster: int, count: int) -> None:
        if count == 0:
            return
        if level == 0:
            members = order[bounds[cluster] : bounds[cluster + 1]]
            chosen = members[:count] if pick == "nearest" else rng.choice(members, count, replace=False)
            picked.append(chosen)
            return
        kids = children[level][cluster]
        for kid, kid_count in zip(kids, allot(sizes[level - 1][kids], count, rng)):
            take(level - 1, int(kid), int(kid_count))

    top = len(tree.levels) - 1
    for cluster, count in enumerate(allot(sizes[top], target, rng)):
        take(top, cluster, int(count))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
