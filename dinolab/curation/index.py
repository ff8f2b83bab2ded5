"""Faiss indexes for cosine similarity (inner product on L2-normalised rows), chosen by pool size.

* ``flat`` (``IndexFlatIP``): exact; for small pools (default: up to 50,000 rows).
* ``ivf`` (``IndexIVFFlat``): inverted lists over a k-means coarse quantiser, full vectors in RAM; searched
  with ``nprobe`` lists per query.
* ``ivfpq`` (``IndexIVFPQ``): inverted lists with product-quantised codes (``pq_m`` bytes a vector), for
  pools whose full vectors do not fit in ``max_ivf_bytes``.

IVF indexes are trained on a random sample of the pool and filled batch by batch, so the pool itself can
stay memory-mapped on disk. PQ scores are approximate: callers re-score candidates with :func:`exact_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from dinolab.curation.arrays import ArrayLike, gather, iter_batches

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """Which Faiss index to build over a pool and how to search it."""

    kind: str = "auto"
    """``auto`` (by pool size), ``flat`` (exact), ``ivf`` (IVFFlat) or ``ivfpq`` (IVFPQ)."""
    exact_max: int = 50_000
    """``auto`` uses the exact flat index up to this many rows."""
    max_ivf_bytes: int = 8 * 2**30
    """``auto`` uses IVFFlat while the float32 vectors fit in this many bytes, IVFPQ beyond."""
    nlist: int | None = None
    """Number of inverted lists; default ``round(2 * sqrt(N))``, at least 1 and at most N / 39."""
    nprobe: int = 8
    """Inverted lists visited per query (more = slower and closer to exact)."""
    pq_m: int | None = None
    """IVFPQ sub-quantisers (bytes per vector); must divide the dimension. Default: dim / 8 (or a divisor)."""
    pq_bits: int = 8
    train_size: int | None = None
    """Rows sampled to train the coarse quantiser / PQ; default ``32 * nlist`` (at least 10,000)."""
    add_batch: int = 65_536
    """Rows added to the index at a time."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.nprobe < 1 or (self.nlist is not None and self.nlist < 1):
            raise ValueError("nprobe and nlist must be >= 1")


DEFAULT_INDEX = IndexConfig()


def choose_kind(num_rows: int, dim: int, config: IndexConfig) -> str:
    """The index kind ``auto`` picks for a pool of ``num_rows x dim`` (an explicit kind is kept)."""
    if config.kind != "auto":
        return config.kind
    if num_rows <= config.exact_max:
        return "flat"
    return "ivf" if num_rows * dim * 4 <= config.max_ivf_bytes else "ivfpq"


def default_nlist(num_rows: int) -> int:
    # ~2 sqrt(N) lists balances quantiser cost (N x nlist) against list scanning (nprobe x N / nlist)
    return max(1, min(round(2 * math.sqrt(num_rows)), num_rows // 39 or 1))


def default_pq_m(dim: int) -> int:
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m >= 1 and dim % m == 0 and m <= 64:  # Faiss' IVFPQ supports up to 64 bytes a code well
            return m
    return next(m for m in range(min(dim, 64), 0, -1) if dim % m == 0)


def sample_rows(num_rows: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers in increasing order (sorted reads suit memory maps)."""
    if size >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size, replace=False))


def build_index(
    x: ArrayLike, config: IndexConfig = DEFAULT_INDEX, train: np.ndarray | None = None, total_rows: int | None = None
) -> faiss.Index:
    """An inner-product index over all rows of ``x`` (row ``i`` has id ``i``).

    ``train`` / ``total_rows``: for one shard of a pool split across processes (:mod:`dinolab.curation.distributed`),
    the global training sample and the pool's size, so that every shard gets the kind, lists and quantiser one
    index over the whole pool would have."""
    num_rows, dim = x.shape
    if num_rows == 0 and total_rows is None:
        raise ValueError("cannot index an empty set of embeddings")
    num_rows = total_rows or num_rows
    kind = choose_kind(num_rows, dim, config)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = min(config.nlist or default_nlist(num_rows), num_rows)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = config.pq_m or default_pq_m(dim)
            if dim % m:
                raise ValueError(f"pq_m={m} must divide the embedding dimension {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, config.pq_bits, faiss.METRIC_INNER_PRODUCT)
        train_size = config.train_size or max(32 * nlist, 10_000)
        if kind == "ivfpq":
            train_size = max(train_size, 64 * 2**config.pq_bits)  # PQ codebooks need data of their own
        if train is None:
            train = gather(x, sample_rows(num_rows, train_size, config.seed))
        index.cp.min_points_per_centroid = 1  # a small sample is a choice here, not a mistake to warn about
        if kind == "ivfpq":
            index.pq.cp.min_points_per_centroid = 1
        index.train(train)
        index.nprobe = min(config.nprobe, nlist)
    for _, batch in iter_batches(x, config.add_batch):
        index.add(batch)
    return index


def is_exact(index: faiss.Index) -> bool:
    """Whether the index returns exact similarities for the neighbours it finds (flat and IVFFlat do; PQ
    codes give approximations). IVF indexes may still miss neighbours outside the probed lists."""
    return isinstance(index, faiss.IndexFlat | faiss.IndexIVFFlat)


def search(
    index: faiss.Index, queries: ArrayLike, k: int, batch_size: int = 16_384
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Batched k-NN: ``(start, scores [B, k], ids [B, k])`` per batch of queries; missing neighbours are -1."""
    k = min(k, index.ntotal)
    for start, batch in iter_batches(queries, batch_size):
        scores, ids = index.search(batch, k)
        yield start, scores, ids


def exact_scores(queries: np.ndarray, base: ArrayLike, ids: np.ndarray) -> np.ndarray:
    """Exact inner products ``[B, k]`` of ``queries [B, D]`` with ``base`` rows ``ids [B, k]`` (-1 -> -inf)."""
    valid = ids >= 0
    vectors = gather(base, np.where(valid, ids, 0).ravel()).reshape(*ids.shape, -1)  # [B, k, D]
    scores = np.einsum("bd,bkd->bk", queries, vectors)
    return np.where(valid, scores, -np.inf).astype(np.float32)


def knn(
    queries: ArrayLike, base: ArrayLike, k: int, config: IndexConfig = DEFAULT_INDEX, batch_size: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar ``base`` rows of each query: ``(scores [Q, k], ids [Q, k])``, best first.

    With a PQ index the candidates' scores are recomputed exactly and re-sorted.
    """
    index = build_index(base, config)
    k = min(k, len(base))
    all_scores = np.empty((len(queries), k), dtype=np.float32)
    all_ids = np.empty((len(queries), k), dtype=np.int64)
    for start, scores, ids in search(index, queries, k, batch_size):
        if not is_exact(index):
            q = np.ascontiguousarray(queries[start : start + len(ids)], dtype=np.float32)
            scores = exact_scores(q, base, ids)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        all_scores[start : start + len(ids)] = scores
        all_ids[start : start + len(ids)] = ids
    return all_scores, all_ids
