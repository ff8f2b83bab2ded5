"""Retrieval around seeds, k-means, hierarchical k-means and balanced sampling, against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from curation_synthetic import blobs, unit
from sklearn.cluster import KMeans

from dinolab.curation import (
    IndexConfig,
    KMeansConfig,
    allot,
    balanced_sample,
    hierarchical_kmeans,
    kmeans,
    retrieve_by_cluster,
    retrieve_nearest,
)
from dinolab.curation.arrays import RowSubset


@pytest.mark.parametrize("n", [1, 4])
def test_sample_retrieval_returns_the_true_nearest_neighbours(n: int) -> None:
    rng = np.random.default_rng(0)
    pool, seeds = unit(rng.standard_normal((3000, 32))), unit(rng.standard_normal((40, 32)))
    result = retrieve_nearest(pool, seeds, n=n, config=IndexConfig(kind="flat"))
    sims = seeds @ pool.T  # brute force
    expected = np.argsort(-sims, axis=1)[:, :n]
    np.testing.assert_array_equal(result.neighbors, expected)
    np.testing.assert_allclose(result.similarity, np.take_along_axis(sims, expected, 1), atol=1e-5)
    np.testing.assert_array_equal(result.selected, np.unique(expected))


def test_sample_retrieval_with_ivf_reports_exact_scores_and_high_recall() -> None:
    pool, _ = blobs([200] * 30, dim=32, spread=1.0, seed=1)
    seeds = pool[np.random.default_rng(2).choice(len(pool), 50, replace=False)] * 0.999
    result = retrieve_nearest(pool, unit(seeds), n=4, config=IndexConfig(kind="ivf", nlist=30, nprobe=4))
    sims = unit(seeds) @ pool.T
    expected = np.argsort(-sims, axis=1)[:, :4]
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(result.neighbors, expected)])
    assert recall >= 0.9, recall
    np.testing.assert_allclose(result.similarity, np.take_along_axis(sims, result.neighbors, 1), atol=1e-5)
    assert np.all(np.diff(result.similarity, axis=1) <= 1e-6)  # best first


def test_cluster_retrieval_rebalances_an_over_represented_concept() -> None:
    sizes = [2000, 100, 100, 100, 100]  # concept 0 is 20x larger
    pool, concept = blobs(sizes, dim=32, spread=0.4, seed=3)
    seed_rows = [int(np.nonzero(concept == c)[0][0]) for c in range(5)]
    seeds = unit(pool[seed_rows] + 0.01)
    result = retrieve_by_cluster(pool, seeds, num_clusters=5, m=50, config=KMeansConfig(niter=10, seed=0))
    picked = concept[result.selected]
    share_before = sizes[0] / sum(sizes)
    share_after = np.mean(picked == 0)
    assert share_before > 0.8 and share_after == pytest.approx(0.2, abs=0.02), share_after
    # every seed gets m images of its own concept, the m members of its cluster most similar to it
    for s in range(5):
        assert np.all(concept[result.neighbors[s]] == s)
        members = np.nonzero(result.pool_cluster == result.seed_cluster[s])[0]
        best = members[np.argsort(-(pool[members] @ seeds[s]))[:50]]
        np.testing.assert_array_equal(np.sort(result.neighbors[s]), np.sort(best))


def test_kmeans_assignment_is_nearest_centroid_and_matches_sklearn_inertia() -> None:
    x, _ = blobs([300, 200, 250, 150], dim=16, spread=0.5, seed=4)
    result = kmeans(RowSubset(x, np.arange(len(x))), 4, KMeansConfig(niter=25, seed=0))
    d2 = ((x[:, None, :] - result.centroids[None]) ** 2).sum(-1)  # brute-force distances [N, K]
    np.testing.assert_array_equal(result.assignment, d2.argmin(1))
    np.testing.assert_allclose(result.distance, d2.min(1), rtol=1e-4, atol=1e-5)
    reference = KMeans(4, n_init=4, random_state=0).fit(x)
    assert result.distance.sum() == pytest.approx(reference.inertia_, rel=0.02)


def test_allot_is_water_filling() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        sizes = rng.integers(0, 30, rng.integers(1, 8))
        target = int(rng.integers(0, sizes.sum() + 5))
        # reference: hand out one unit at a time to the non-full group with the fewest so far (largest first)
        counts = np.zeros_like(sizes)
        for _ in range(min(target, sizes.sum())):
            open_ = np.nonzero(counts < sizes)[0]
            fewest = open_[counts[open_] == counts[open_].min()]
            counts[fewest[np.argmax(sizes[fewest])]] += 1
        np.testing.assert_array_equal(allot(sizes, target), counts)
        randomised = allot(sizes, target, np.random.default_rng(0))
        assert randomised.sum() == counts.sum() and np.all(randomised <= sizes)
        np.testing.assert_array_equal(np.sort(randomised), np.sort(counts))


def test_hierarchical_kmeans_tree_structure() -> None:
    x, _ = blobs([100] * 8, dim=16, spread=0.5, seed=6)
    tree = hierarchical_kmeans(x, [32, 8, 2], KMeansConfig(niter=10))
    assert [len(level.centroids) for level in tree.levels] == [32, 8, 2]
    assert len(tree.levels[1].assignment) == 32 and len(tree.levels[2].assignment) == 8
    top = tree.point_clusters(2)
    np.testing.assert_array_equal(top, tree.levels[2].assignment[tree.levels[1].assignment[tree.levels[0].assignment]])
    np.testing.assert_array_equal(tree.sizes(2), np.bincount(top, minlength=2))
    for parent, kids in enumerate(tree.children(2)):
        np.testing.assert_array_equal(np.sort(kids), np.nonzero(tree.levels[2].assignment == parent)[0])
    with pytest.raises(ValueError, match="non-increasing"):
        hierarchical_kmeans(x, [8, 32])


@pytest.mark.parametrize("pick", ["nearest", "random"])
def test_hierarchical_sampling_rebalances_an_over_represented_concept(pick: str) -> None:
    sizes = [2000] + [100] * 9  # one concept 20x larger than each of the others
    x, concept = blobs(sizes, dim=32, spread=0.4, seed=7)
    tree = hierarchical_kmeans(x, [40, 10], KMeansConfig(niter=15, seed=0))
    chosen = balanced_sample(tree, 500, pick=pick, seed=0)
    assert len(chosen) == len(np.unique(chosen)) == 500
    share_before = sizes[0] / sum(sizes)
    share_after = np.mean(concept[chosen] == 0)
    assert share_before > 0.65 and share_after <= 0.15, share_after
    assert np.all(np.bincount(concept[chosen], minlength=10) >= 25)  # every concept is represented
    # the top level is allotted by water-filling over its cluster sizes
    top = tree.point_clusters(1)
    np.testing.assert_array_equal(np.sort(np.bincount(top[chosen], minlength=10)), np.sort(allot(tree.sizes(1), 500)))
    if pick == "nearest":  # inside every leaf, the chosen points are the ones closest to its centroid
        leaves = tree.levels[0]
        for leaf in np.unique(leaves.assignment[chosen]):
            members = np.nonzero(leaves.assignment == leaf)[0]
            inside = np.isin(members, chosen)
            if not inside.all():
                assert leaves.distance[members[inside]].max() <= leaves.distance[members[~inside]].min()


def test_resampling_moves_centroids_out_of_a_dense_region() -> None:
    # k-means puts centroids where points are dense (about 12 of 20 in the dense square); resampling an even
    # share of every cluster spreads them over the support (the dense square is 1/9 of its area)
    rng = np.random.default_rng(8)
    dense = rng.uniform(-1, 1, (3000, 2))
    sparse = rng.uniform(-3, 3, (300, 2))
    x = np.concatenate([dense, sparse]).astype(np.float32)

    def in_dense_square(tree) -> int:
        return int((np.abs(tree.levels[0].centroids).max(axis=1) < 1).sum())

    for seed in (0, 1):
        config = KMeansConfig(niter=20, seed=seed)
        plain = in_dense_square(hierarchical_kmeans(x, [20], config))
        refined = in_dense_square(hierarchical_kmeans(x, [20], config, resampling_steps=5, sample_sizes=[10]))
        assert plain >= 10 and refined <= plain - 4, (plain, refined)
