"""Deduplication and decontamination on generated embeddings with planted near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest
from curation_synthetic import brute_force_dedup, perturb, planted_duplicates, unit

from dinolab.curation import IndexConfig, decontaminate, deduplicate
from dinolab.curation.arrays import ShardedArray

FLAT = IndexConfig(kind="flat")
IVF = IndexConfig(kind="ivf", nlist=16, nprobe=4)
IVFPQ = IndexConfig(kind="ivfpq", nlist=16, nprobe=4, pq_m=16, pq_bits=6)  # approximate scores, re-scored


def test_dedup_matches_brute_force_union_find() -> None:
    x, _ = planted_duplicates(num_unique=150, num_copies=60, num_near_misses=30, dim=32, seed=1)
    # chains: a copy of a copy joins the same component
    x = np.concatenate([x, perturb(x[150:160], 0.12, np.random.default_rng(5))])
    result = deduplicate(x, threshold=0.95, k=len(x) - 1, config=FLAT)
    keep, twin = brute_force_dedup(x, 0.95)
    np.testing.assert_array_equal(result.keep, keep)
    np.testing.assert_array_equal(result.twin, twin)
    removed = ~result.keep
    np.testing.assert_allclose(result.similarity[removed], np.sum(x[removed] * x[twin[removed]], axis=1), atol=1e-5)
    assert np.all(result.similarity[result.keep] == 1.0)


@pytest.mark.parametrize("config", [FLAT, IVF, IVFPQ], ids=["flat", "ivf", "ivfpq"])
def test_dedup_recall_and_precision_on_planted_copies(config: IndexConfig) -> None:
    x, original = planted_duplicates(num_unique=3000, num_copies=300, num_near_misses=300, dim=64, seed=0)
    result = deduplicate(ShardedArray([x[:1000], x[1000:2500], x[2500:]]), threshold=0.95, k=8, config=config)
    planted = original >= 0
    removed = ~result.keep
    recall = (removed & planted).sum() / planted.sum()
    precision = (removed & planted).sum() / max(removed.sum(), 1)
    assert recall >= (1.0 if config.kind == "flat" else 0.97), recall
    assert precision == 1.0, precision  # near misses (cos ~0.86) and random rows are never dropped
    # a removed copy keeps its original (the originals come first, so they are the lowest rows)
    found = removed & planted
    np.testing.assert_array_equal(result.twin[found], original[found])


def test_decontamination_drops_exactly_the_planted_copies() -> None:
    rng = np.random.default_rng(3)
    eval_a, eval_b = unit(rng.standard_normal((200, 48))), unit(rng.standard_normal((100, 48)))
    pool = unit(rng.standard_normal((2000, 48)))
    planted = rng.choice(2000, 80, replace=False)
    pool[planted[:50]] = perturb(eval_a[rng.integers(0, 200, 50)], 0.1, rng)
    pool[planted[50:]] = perturb(eval_b[rng.integers(0, 100, 30)], 0.1, rng)
    near = np.setdiff1d(np.arange(2000), planted)[:40]
    pool[near] = perturb(eval_a[rng.integers(0, 200, 40)], 0.6, rng)  # similar, not copies: stay

    result = decontaminate(pool, [eval_a, eval_b], threshold=0.95, config=FLAT)
    expected = np.zeros(2000, dtype=bool)
    expected[planted] = True
    np.testing.assert_array_equal(result.drop, expected)
    # the reported similarity is the brute-force maximum over both sets, and points at it
    sims = np.concatenate([pool @ eval_a.T, pool @ eval_b.T], axis=1)
    np.testing.assert_allclose(result.similarity, sims.max(axis=1), atol=1e-5)
    best = sims.argmax(axis=1)
    np.testing.assert_array_equal(result.match_set, (best >= 200).astype(np.int64))
    np.testing.assert_array_equal(result.match, np.where(best >= 200, best - 200, best))


def test_decontamination_with_ivf_index_finds_the_copies() -> None:
    rng = np.random.default_rng(4)
    eval_set = unit(rng.standard_normal((60_000, 16)))  # large enough that auto picks IVF
    pool = unit(rng.standard_normal((500, 16)))
    planted = rng.choice(500, 50, replace=False)
    pool[planted] = perturb(eval_set[rng.integers(0, 60_000, 50)], 0.05, rng)
    result = decontaminate(pool, [eval_set], threshold=0.97, config=IndexConfig(nlist=64, nprobe=4))
    dropped = np.nonzero(result.drop)[0]
    assert set(dropped) <= set(planted)  # exact re-scoring: never a false drop
    assert len(dropped) >= 0.95 * len(planted)


def test_bad_inputs_are_named() -> None:
    x = unit(np.random.default_rng(0).standard_normal((10, 8)))
    with pytest.raises(ValueError, match="threshold"):
        deduplicate(x, threshold=1.5)
    with pytest.raises(ValueError, match="same model"):
        decontaminate(x, [unit(np.ones((3, 4)))])
