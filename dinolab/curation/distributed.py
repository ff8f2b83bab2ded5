"""Curation across processes (torchrun): each rank holds one contiguous block of the pool's rows.

Nothing here is cluster code of our own: ranks talk through ``torch.distributed`` collectives (gloo on CPU, NCCL
when tensors live on GPUs). Every function is a collective (all ranks call it) and gives the result of the
single-process function of the same name on the whole pool:

* :func:`kmeans` / :func:`hierarchical_kmeans`: the training sample is the same global sample of rows; Lloyd
  iterations assign each rank's part of it and all-reduce per-centroid sums and counts (float64). Levels above the
  first cluster centroids (small, replicated): every rank runs the single-process k-means on them identically.
  Same init as one process (k-means++ on the gathered sample while it is small, else Faiss's random rows from
  Faiss's own permutation) and empty clusters re-seeded exactly as Faiss does: assignments equal, centroids to
  float rounding.
* :func:`balanced_sample`: cluster sizes all-reduced; the per-leaf quotas computed by the single-process
  recursion (same random draws), then each leaf's nearest points found by a bisection of the distance threshold
  over all ranks (32 all-reduces of per-leaf counts: memory per rank is O(leaves), not O(target)).
* :func:`deduplicate`: every rank indexes its own rows (IVF quantisers trained on the same global sample, so the
  shards together are the single index), searches every rank's queries against it batch by batch, and each query's
  candidates from all shards are merged; duplicate edges are gathered and their connected components computed on
  every rank (only rows that have an edge enter the graph), so a component spanning ranks is one component.

Faiss GPU indexes are used when ``faiss`` was built with GPU support and CUDA is present (:func:`to_gpu`).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import kmeans_plusplus

from dinolab.curation.arrays import ArrayLike, RowSubset, gather
from dinolab.curation.dedup import DedupResult
from dinolab.curation.dedup import deduplicate as single_process_dedup
from dinolab.curation.index import DEFAULT_INDEX, IndexConfig, build_index, exact_scores, is_exact, sample_rows
from dinolab.curation.kmeans import DEFAULT_KMEANS, ClusterTree, KMeansConfig, KMeansResult, allot, assign
from dinolab.curation.kmeans import balanced_sample as single_process_balanced_sample
from dinolab.curation.kmeans import hierarchical_kmeans as single_process_tree
from dinolab.runtime import join_process_group, world


# ------------------------------------------------------------------------------------------------ plumbing
def row_block(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` rank ``rank`` holds: contiguous blocks, sizes differing by at most one."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _all_sum(array: np.ndarray) -> np.ndarray:
    if world()[1] == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    dist.all_reduce(tensor)
    return tensor.numpy()


def _max(value: int) -> int:
    if world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def _all_gather_objects(obj: object) -> list:
    if world()[1] == 1:
        return [obj]
    out: list = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def _gather_rows(x_local: ArrayLike, offset: int, rows: np.ndarray) -> np.ndarray:
    """Global rows ``rows`` (the same sorted list on every rank) of the distributed pool, on every rank."""
    mine = rows[(rows >= offset) & (rows < offset + len(x_local))]
    parts = _all_gather_objects((mine, gather(x_local, mine - offset)))
    found = np.concatenate([p[0] for p in parts])
    vectors = np.concatenate([p[1] for p in parts]) if len(found) else np.zeros((0, x_local.shape[1]), np.float32)
    return vectors[np.argsort(found, kind="stable")]


def _exchange(outgoing: list) -> list:
    """``outgoing[r]`` goes to rank ``r``; returns what every rank sent to this one, in rank order (one gather per
    destination: each rank receives only its own answers, not everyone's)."""
    rank, world_size = world()
    if world_size == 1:
        return outgoing
    incoming: list = []
    for destination in range(world_size):
        received = [None] * world_size if rank == destination else None
        dist.gather_object(outgoing[destination], received, dst=destination)
        if rank == destination:
            incoming = received
    return incoming


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on the local GPU when Faiss has GPU support and CUDA is present, else unchanged."""
    if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        device = torch.cuda.current_device()
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index)
    return index


# ------------------------------------------------------------------------------------------------- k-means
def kmeans(
    x_local: ArrayLike, k: int, offset: int, num_rows: int, config: KMeansConfig = DEFAULT_KMEANS
) -> KMeansResult:
    """k-means of the pool whose rows ``[offset, offset + len(x_local))`` this rank holds (``num_rows`` in all).

    Returns the centroids (same on every rank) and the assignment / distance of this rank's rows.
    """
    if not 1 <= k <= num_rows:
        raise ValueError(f"k-means needs 1 <= k <= number of rows, got k={k} for {num_rows} rows")
    sample = sample_rows(num_rows, k * config.max_points_per_centroid, config.seed)
    mine = sample[(sample >= offset) & (sample < offset + len(x_local))]
    train = gather(x_local, mine - offset)  # this rank's part of the global training sample
    use_kmeanspp = config.init == "kmeans++" or (config.init == "auto" and len(sample) <= config.kmeanspp_max_rows)
    if use_kmeanspp:  # the sample is small: gather it and seed exactly as one process does
        centroids, _ = kmeans_plusplus(_gather_rows(x_local, offset, sample), k, random_state=config.seed)
    else:  # Faiss's random init: the training rows at the first k places of its permutation seeded seed + 1
        perm = np.empty(len(sample), dtype=np.int32)
        faiss.rand_perm(faiss.swig_ptr(perm), len(sample), config.seed + 1)
        chosen = sample[perm[:k]]
        ordered = np.sort(chosen)
        centroids = _gather_rows(x_local, offset, ordered)[np.searchsorted(ordered, chosen)]
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    for _ in range(config.niter):
        totals = _all_sum(_cluster_sums(train, centroids, config.batch_size))  # [k, D + 1]: sums, counts
        sums, counts = totals[:, :-1], totals[:, -1]
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        _reseed_empty(centroids, counts, len(sample))
        if config.spherical:
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    assignment, distance = assign(x_local, centroids, config.batch_size)
    return KMeansResult(centroids, assignment, distance)


def _cluster_sums(train: np.ndarray, centroids: np.ndarray, batch_size: int) -> np.ndarray:
    """Per centroid: the float64 sum of the rows nearest to it and their count, ``[k, D + 1]`` (in batches, so
    memory stays at one batch in float64)."""
    k, dim = centroids.shape
    totals = torch.zeros(k, dim + 1, dtype=torch.float64)
    if len(train):
        labels, _ = assign(train, centroids, batch_size)
        for start in range(0, len(train), batch_size):
            rows = torch.from_numpy(train[start : start + batch_size]).double()
            rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
            totals.index_add_(0, torch.from_numpy(labels[start : start + batch_size]), rows)
    return totals.numpy()


def _reseed_empty(centroids: np.ndarray, counts: np.ndarray, num_train: int) -> None:
    """Faiss's handling of empty clusters (``split_clusters`` in faiss/Clustering.cpp), reproduced so that a run
    with empty clusters still equals one process: for each empty cluster ``ci``, walk the clusters ``cj = 0, 1, …``
    (cyclically) and split the first one for which a draw of Faiss's generator (mt19937 seeded 1234, anew each
    iteration) falls below ``(count_j - 1) / (n - k)``; ``ci`` and ``cj`` become the centroid times ``1 ± eps`` on
    alternating coordinates and share its count."""
    k, dim = centroids.shape
    if not (counts == 0).any():
        return
    generator = np.random.MT19937(0)
    generator._legacy_seeding(1234)  # std::mt19937(1234)
    eps = np.float32(1 / 1024)
    up = np.where(np.arange(dim) % 2 == 0, 1 + eps, 1 - eps).astype(np.float32)
    down = np.where(np.arange(dim) % 2 == 0, 1 - eps, 1 + eps).astype(np.float32)
    counts = counts.astype(np.float32)
    for ci in range(k):
        if counts[ci] != 0:
            continue
        cj = 0
        while True:
            p = (float(counts[cj]) - 1.0) / float(np.float32(num_train - k))
            r = float(np.float32(generator.random_raw()) / np.float32(4294967295.0))
            if r < p:
                break
            cj = (cj + 1) % k
        centroids[ci] = centroids[cj] * up
        centroids[cj] = centroids[cj] * down
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]


def hierarchical_kmeans(
    x_local: ArrayLike,
    offset: int,
    num_rows: int,
    clusters: list[int],
    config: KMeansConfig = DEFAULT_KMEANS,
    resampling_steps: list[int] | int = 0,
) -> ClusterTree:
    """The cluster tree of :func:`dinolab.curation.kmeans.hierarchical_kmeans` (same seeds per level); level 0
    holds this rank's rows. Resampling refinement is supported above level 0 (as the pipeline uses it)."""
    steps = [resampling_steps] * len(clusters) if isinstance(resampling_steps, int) else list(resampling_steps)
    if steps[0]:
        raise ValueError("resampling refinement of the first level is not supported across processes")
    levels = [kmeans(x_local, clusters[0], offset, num_rows, config)]
    if clusters[1:]:  # one process seeds level l with config.seed + 1000 * l: shift the upper tree by one level
        shifted = KMeansConfig(**{**config.__dict__, "seed": config.seed + 1000})
        upper = single_process_tree(levels[0].centroids, clusters[1:], shifted, steps[1:])
        levels += upper.levels
    return ClusterTree(levels)


# ----------------------------------------------------------------------------------------- balanced sampling
def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (negative values included), as int64."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)
    return np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits + (1 << 31))


def _random_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random 32-bit key per global row (splitmix64), the same on any number of ranks."""
    z = (rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(31)
    z *= np.uint64(0x94D049BB133111EB)
    return (z >> np.uint64(32)).astype(np.int64)


def leaf_quotas(tree: ClusterTree, sizes: list[np.ndarray], target: int, seed: int) -> np.ndarray:
    """Points to take from every leaf: the allotment recursion of the single-process balanced sampling with
    ``pick='nearest'`` (same random draws, in the same order)."""
    rng = np.random.default_rng(seed)
    children = [None] + [tree.children(level) for level in range(1, len(tree.levels))]
    quotas = np.zeros(len(tree.levels[0].centroids), dtype=np.int64)

    def take(level: int, cluster: int, count: int) -> None:
        if count == 0:
            return
        if level == 0:
            quotas[cluster] = count
            return
        kids = children[level][cluster]
        for kid, kid_count in zip(kids, allot(sizes[level - 1][kids], count, rng)):
            take(level - 1, int(kid), int(kid_count))

    top = len(tree.levels) - 1
    for cluster, count in enumerate(allot(sizes[top], target, rng)):
        take(top, cluster, int(count))
    return quotas


def balanced_sample(tree: ClusterTree, offset: int, target: int, pick: str = "nearest", seed: int = 0) -> np.ndarray:
    """This rank's share (global row numbers, sorted) of :func:`dinolab.curation.kmeans.balanced_sample` on the
    whole tree. ``nearest`` gives exactly the single-process selection; ``random`` draws a uniformly random subset
    per leaf from a per-row hash (another draw than one process makes)."""
    if pick not in ("nearest", "random"):
        raise ValueError(f"pick must be 'nearest' or 'random', got {pick!r}")
    leaf = tree.levels[0].assignment
    num_leaves = len(tree.levels[0].centroids)
    leaf_sizes = _all_sum(np.bincount(leaf, minlength=num_leaves).astype(np.int64))
    sizes = [leaf_sizes]
    for level in range(1, len(tree.levels)):
        sizes.append(
            np.bincount(
                tree.levels[level].assignment, weights=sizes[-1], minlength=len(tree.levels[level].centroids)
            ).astype(np.int64)
        )
    quotas = leaf_quotas(tree, sizes, target, seed)
    rows = np.arange(offset, offset + len(leaf), dtype=np.int64)
    keys = _sortable(tree.levels[0].distance) if pick == "nearest" else _random_keys(rows, seed)
    # smallest threshold t per leaf with #{key <= t} >= quota, over all ranks
    lo, hi = np.zeros(num_leaves, np.int64), np.full(num_leaves, (1 << 32) - 1, np.int64)
    for _ in range(32):
        mid = (lo + hi) // 2
        below = _all_sum(np.bincount(leaf, weights=keys <= mid[leaf], minlength=num_leaves).astype(np.int64))
        enough = below >= quotas
        hi, lo = np.where(enough, mid, hi), np.where(enough, lo, mid + 1)
    threshold = lo
    chosen = keys < threshold[leaf]
    strictly = _all_sum(np.bincount(leaf, weights=chosen, minlength=num_leaves).astype(np.int64))
    # ties at the threshold: the lowest rows, as the single-process stable sort takes them
    tied = (keys == threshold[leaf]) & (quotas[leaf] > strictly[leaf])
    tie_parts = _all_gather_objects((leaf[tied], rows[tied]))
    tie_leaf = np.concatenate([p[0] for p in tie_parts])
    tie_rows = np.concatenate([p[1] for p in tie_parts])
    order = np.lexsort((tie_rows, tie_leaf))
    tie_leaf, tie_rows = tie_leaf[order], tie_rows[order]
    rank_in_leaf = np.arange(len(tie_leaf)) - np.searchsorted(tie_leaf, tie_leaf)
    taken = tie_rows[rank_in_leaf < (quotas - strictly)[tie_leaf]]
    selected = np.concatenate([rows[chosen], taken[(taken >= offset) & (taken < offset + len(leaf))]])
    return np.sort(selected)


# --------------------------------------------------------------------------------------------- deduplication
@dataclass
class _Shards:
    """This rank's index over its rows (global ids) and the global row count."""

    index: faiss.Index
    offset: int
    exact: bool


def _shard_index(x_local: ArrayLike, offset: int, num_rows: int, config: IndexConfig) -> _Shards:
    kind_rows = num_rows  # the kind and the number of lists follow the whole pool, as one process chooses them
    train = None
    if config.kind != "flat" and not (config.kind == "auto" and num_rows <= config.exact_max):
        from dinolab.curation.index import choose_kind, default_nlist

        kind = choose_kind(num_rows, x_local.shape[1], config)
        nlist = min(config.nlist or default_nlist(num_rows), num_rows)
        train_size = config.train_size or max(32 * nlist, 10_000)
        if kind == "ivfpq":
            train_size = max(train_size, 64 * 2**config.pq_bits)
        train = _gather_rows(x_local, offset, sample_rows(num_rows, train_size, config.seed))
    index = build_index(x_local, config, train=train, total_rows=kind_rows)
    return _Shards(to_gpu(index), offset, is_exact(index))


def _search_all(shards: _Shards, x_local: ArrayLike, k: int, batch_size: int):
    """For each batch of this rank's rows: ``(start, scores [B, k], global ids [B, k])``, the best ``k`` over every
    rank's shard (exact scores)."""
    _, world_size = world()
    num_batches = _max(-(-len(x_local) // batch_size))
    dim = x_local.shape[1]
    for b in range(num_batches):
        start = b * batch_size
        queries = np.ascontiguousarray(x_local[start : min(start + batch_size, len(x_local))], dtype=np.float32)
        everyone = _all_gather_objects(queries) if world_size > 1 else [queries]
        results = []
        for q in everyone:  # every rank's queries against this rank's shard
            kk = min(k, shards.index.ntotal)
            scores, ids = (
                shards.index.search(q.reshape(-1, dim), kk)
                if len(q)
                else (np.zeros((0, kk)), np.zeros((0, kk), np.int64))
            )
            if not shards.exact:
                scores = exact_scores(q, x_local, ids)
            results.append((scores.astype(np.float32), np.where(ids >= 0, ids + shards.offset, -1)))
        mine = _exchange(results)  # this rank's queries, answered by every shard
        scores = np.concatenate([m[0] for m in mine], axis=1)
        ids = np.concatenate([m[1] for m in mine], axis=1)
        order = np.lexsort((ids, -scores), axis=1)[:, :k] if len(ids) else np.zeros((0, k), np.int64)
        if len(queries):
            yield start, np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def deduplicate(
    x_local: ArrayLike,
    offset: int,
    num_rows: int,
    threshold: float = 0.95,
    k: int = 16,
    config: IndexConfig = DEFAULT_INDEX,
    batch_size: int = 16_384,
) -> DedupResult:
    """:func:`dinolab.curation.dedup.deduplicate` of the whole pool; the result covers this rank's rows, with
    ``twin`` and ``component`` as global row numbers (a component is labelled by its lowest row)."""
    shards = _shard_index(x_local, offset, num_rows, config)
    src, dst, pair_scores = [], [], []
    for start, scores, ids in _search_all(shards, x_local, k + 1, batch_size):  # +1: each row finds itself
        rows = np.arange(offset + start, offset + start + len(ids))[:, None]
        other = (ids >= 0) & (ids != rows)
        pair_scores.append(scores[other])
        hit = other & (scores >= threshold)
        src.append(np.broadcast_to(rows, ids.shape)[hit])
        dst.append(ids[hit])
    edges = _all_gather_objects(
        (np.concatenate(src or [np.zeros(0, np.int64)]), np.concatenate(dst or [np.zeros(0, np.int64)]))
    )
    all_src = np.concatenate([e[0] for e in edges])
    all_dst = np.concatenate([e[1] for e in edges])
    nodes, compact = np.unique(np.concatenate([all_src, all_dst]), return_inverse=True)
    n_edges = len(all_src)
    graph = coo_matrix((np.ones(n_edges, np.int8), (compact[:n_edges], compact[n_edges:])), shape=(len(nodes),) * 2)
    _, labels = connected_components(graph.tocsr(), directed=False)
    lowest = np.full(labels.max() + 1 if len(nodes) else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(lowest, labels, nodes)
    rows = np.arange(offset, offset + len(x_local), dtype=np.int64)
    twin = rows.copy()
    where = np.searchsorted(nodes, rows)
    in_graph = (
        (where < len(nodes)) & (nodes[np.minimum(where, len(nodes) - 1)] == rows)
        if len(nodes)
        else np.zeros(len(rows), bool)
    )
    twin[in_graph] = lowest[labels[where[in_graph]]]
    keep = twin == rows
    similarity = np.ones(len(rows), dtype=np.float32)
    removed = np.nonzero(~keep)[0]
    needed = np.unique(np.concatenate(_all_gather_objects(twin[removed])))
    twin_vectors = _gather_rows(x_local, offset, needed)
    if len(removed):
        mine = gather(x_local, removed)
        theirs = twin_vectors[np.searchsorted(needed, twin[removed])]
        similarity[removed] = np.einsum("bd,bd->b", mine, theirs)
    pairs = np.concatenate(pair_scores).astype(np.float32) if pair_scores else np.zeros(0, np.float32)
    return DedupResult(keep, twin, similarity, twin.copy(), pairs)


def rows_of(x: np.ndarray) -> tuple[np.ndarray, int]:
    """This rank's block of a pool held whole in memory (tests, small pools): ``(rows, offset)``."""
    rank, world_size = world()
    start, stop = row_block(len(x), rank, world_size)
    return x[start:stop], start


# ------------------------------------------------------------------------------- the pipeline under torchrun
def init_from_env() -> bool:
    """Join torchrun's process group (gloo: the collectives carry numpy arrays) when launched with
    ``WORLD_SIZE > 1``; returns whether this is a multi-process run."""
    join_process_group("gloo", min_world_size=2)
    return world()[1] > 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _gather_concat(local: np.ndarray) -> np.ndarray:
    return np.concatenate(_all_gather_objects(local)) if world()[1] > 1 else local


def deduplicate_everywhere(x: ArrayLike, threshold: float, k: int, config: IndexConfig) -> DedupResult:
    """:func:`dinolab.curation.dedup.deduplicate` of ``x`` (the same whole pool on every rank, read lazily): split
    across the ranks of a process group, then gathered so that every rank holds the whole result."""
    rank, world_size = world()
    if world_size == 1:
        return single_process_dedup(x, threshold, k, config)
    start, stop = row_block(len(x), rank, world_size)
    local = deduplicate(RowSubset(x, np.arange(start, stop)), start, len(x), threshold, k, config)
    return DedupResult(
        *(_gather_concat(getattr(local, name)) for name in ("keep", "twin", "similarity", "component")),
        pair_similarities=_gather_concat(local.pair_similarities),
    )


def balance_everywhere(
    x: ArrayLike,
    clusters: list[int],
    config: KMeansConfig,
    resampling_steps: list[int],
    target: int,
    pick: str,
    seed: int,
) -> tuple[ClusterTree, np.ndarray]:
    """The cluster tree and the balanced selection of ``x`` (the same whole pool on every rank): hierarchical
    k-means and balanced sampling split across the ranks of a process group, gathered on every rank."""
    rank, world_size = world()
    if world_size == 1:
        tree = single_process_tree(x, clusters, config, resampling_steps)
        return tree, single_process_balanced_sample(tree, target, pick, seed)
    start, stop = row_block(len(x), rank, world_size)
    local = RowSubset(x, np.arange(start, stop))
    tree = hierarchical_kmeans(local, start, len(x), clusters, config, resampling_steps)
    chosen = _gather_concat(balanced_sample(tree, start, target, pick, seed))
    leaves = tree.levels[0]
    whole = KMeansResult(leaves.centroids, _gather_concat(leaves.assignment), _gather_concat(leaves.distance))
    return ClusterTree([whole, *tree.levels[1:]]), chosen
