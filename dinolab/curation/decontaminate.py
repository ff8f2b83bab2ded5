"""Decontamination: drop pool images that are near-duplicates of any evaluation image.

Reference semantics: ``drop[i] = max_{s, j} cos(pool_i, eval_s_j) >= threshold`` over every evaluation set
``s``. The index is built over each evaluation set (usually far smaller than the pool) and the pool is
streamed through it in batches; approximate candidates are re-scored exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinolab.curation.arrays import ArrayLike
from dinolab.curation.index import DEFAULT_INDEX, IndexConfig, build_index, exact_scores, is_exact, search


@dataclass
class DecontaminationResult:
    """Per pool row ``[N]``."""

    drop: np.ndarray
    """bool: the row is a near-duplicate of an evaluation image."""
    similarity: np.ndarray
    """float32: highest cosine similarity to any evaluation image."""
    match_set: np.ndarray
    """int64: which evaluation set holds the closest image (-1 when there is none)."""
    match: np.ndarray
    """int64: row of the closest image in that set (-1 when there is none)."""

    @property
    def num_dropped(self) -> int:
        return int(self.drop.sum())


def decontaminate(
    pool: ArrayLike,
    eval_sets: Sequence[ArrayLike],
    threshold: float = 0.95,
    config: IndexConfig = DEFAULT_INDEX,
    candidates: int = 4,
    batch_size: int = 16_384,
) -> DecontaminationResult:
    """Mark the pool rows whose similarity to some evaluation row is ``>= threshold``.

    ``candidates`` neighbours per pool row are fetched from an approximate index before exact re-scoring.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    n = len(pool)
    best = np.full(n, -np.inf, dtype=np.float32)
    match_set = np.full(n, -1, dtype=np.int64)
    match = np.full(n, -1, dtype=np.int64)
    for set_id, eval_x in enumerate(eval_sets):
        if len(eval_x) == 0:
            continue
        if eval_x.shape[1] != pool.shape[1]:
            raise ValueError(
                f"evaluation set {set_id} has {eval_x.shape[1]}-d embeddings but the pool {pool.shape[1]}-d; "
                "embed both with the same model"
            )
        index = build_index(eval_x, config)
        k = 1 if is_exact(index) else candidates
        for start, scores, ids in search(index, pool, k, batch_size):
            if not is_exact(index):
                scores = exact_scores(
                    np.ascontiguousarray(pool[start : start + len(ids)], dtype=np.float32), eval_x, ids
                )
            top = scores.argmax(axis=1)
            top_score = scores[np.arange(len(ids)), top]
            top_id = ids[np.arange(len(ids)), top]
            rows = slice(start, start + len(ids))
            better = top_score > best[rows]
            best[rows] = np.where(better, top_score, best[rows])
            match_set[rows] = np.where(better, set_id, match_set[rows])
            match[rows] = np.where(better, top_id, match[rows])
    return DecontaminationResult(best >= threshold, best, match_set, match)
