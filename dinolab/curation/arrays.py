"""Lazy row access to embeddings: what the curation algorithms read, whatever holds the rows.

:class:`ArrayLike` is the protocol (``len``, ``shape``, rows by slice or index array): a numpy array (also
memory-mapped), a :class:`ShardedArray` over a store's memory-mapped shards, or a :class:`RowSubset` of either
(a pool after deduplication). :func:`rows`, :func:`gather` and :func:`iter_batches` give contiguous float32 rows,
the input Faiss takes, one batch at a time, so pools larger than RAM can be searched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np


class ArrayLike(Protocol):
    """What the curation algorithms read: ``len``, ``shape`` and row access by slice or index array.

    ``numpy.ndarray`` (also memory-mapped), :class:`ShardedArray` and :class:`RowSubset` qualify.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> np.ndarray: ...


# -------------------------------------------------------------------------------------------- array access
def rows(x: ArrayLike, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of ``x`` as a contiguous float32 array (what Faiss takes)."""
    return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def gather(x: ArrayLike, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (any order, repeats allowed) of ``x`` as a contiguous float32 array ``[len(index), D]``."""
    return np.ascontiguousarray(x[np.asarray(index, dtype=np.int64)], dtype=np.float32)


def iter_batches(x: ArrayLike, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows [B, D] float32)`` over ``x`` in order."""
    for start in range(0, len(x), batch_size):
        yield start, rows(x, start, min(start + batch_size, len(x)))


class ShardedArray:
    """The row-concatenation of several 2-D arrays (memory-mapped shards), read as float32."""

    def __init__(self, parts: Sequence[np.ndarray], dim: int | None = None) -> None:
        parts = [p for p in parts if len(p)]
        dims = {p.shape[1] for p in parts}
        if len(dims) > 1:
            raise ValueError(f"shards have different embedding sizes {sorted(dims)}; the store mixes models")
        self.parts = parts
        self.dim = dims.pop() if dims else (dim or 0)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets[-1]), self.dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty((max(stop - start, 0), self.dim), dtype=np.float32)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            for p in range(max(first, 0), len(self.parts)):
                lo, hi = max(start, self.offsets[p]), min(stop, self.offsets[p + 1])
                if lo >= hi:
                    break
                out[lo - start : hi - start] = self.parts[p][lo - self.offsets[p] : hi - self.offsets[p]]
            return out
        index = np.asarray(key)
        if index.ndim == 0:
            row = int(index) + len(self) if int(index) < 0 else int(index)
            if not 0 <= row < len(self):
                raise IndexError(f"row {int(index)} out of range for {len(self)} rows")
            return self[row : row + 1][0]
        index = index.astype(np.int64)
        if len(index) and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        index = np.where(index < 0, index + len(self), index)
        out = np.empty((len(index), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, index, side="right") - 1
        for p in np.unique(part_of):
            where = np.nonzero(part_of == p)[0]
            local = index[where] - self.offsets[p]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to memory maps
            out[where[order]] = self.parts[p][local[order]]
        return out


class RowSubset:
    """Rows ``rows`` of a base array, addressed ``0 .. len(rows)-1`` (a pool after dedup / decontamination)."""

    def __init__(self, base: ArrayLike, rows: np.ndarray) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.base.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        return gather(self.base, self.rows[key])
