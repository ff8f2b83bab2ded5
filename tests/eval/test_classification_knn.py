"""k-NN: votes against a naive per-sample loop, predictions against scikit-learn, chunking, few-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from dinolab.eval.features import Features
from dinolab.eval.knn import KnnConfig, knn_accuracy, knn_class_scores, run_knn, sample_per_class


def naive_knn_scores(
    train: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int, num_classes: int, temperature: float
) -> np.ndarray:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    scores = np.zeros((len(query), num_classes))
    for q in range(len(query)):
        sims = [float(train[j] @ query[q]) for j in range(len(train))]
        for j in sorted(range(len(train)), key=lambda j: -sims[j])[:k]:
            scores[q, labels[j]] += np.exp(sims[j] / temperature)
    return scores


def blobs(n: int, num_classes: int = 4, dim: int = 8, spread: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    return (centers[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_votes_match_naive_loop() -> None:
    train, labels = blobs(60)
    query, _ = blobs(9, seed=1)
    train_t = F.normalize(torch.from_numpy(train), dim=1)
    query_t = F.normalize(torch.from_numpy(query), dim=1)
    scores = knn_class_scores(
        train_t, torch.from_numpy(labels), query_t, ks=(1, 5, 20), num_classes=4, temperature=0.07
    )
    for k in (1, 5, 20):
        expected = naive_knn_scores(train, labels, query, k, 4, 0.07)
        np.testing.assert_allclose(scores[k].numpy(), expected, rtol=2e-4)


@pytest.mark.parametrize("k", [1, 7, 15])
def test_uniform_predictions_match_sklearn(k: int) -> None:
    train, labels = blobs(80, spread=2.5)
    query, _ = blobs(40, spread=2.5, seed=3)
    scores = knn_class_scores(
        F.normalize(torch.from_numpy(train), dim=1),
        torch.from_numpy(labels),
        F.normalize(torch.from_numpy(query), dim=1),
        ks=(k,),
        num_classes=4,
        weighting="uniform",
    )
    reference = KNeighborsClassifier(n_neighbors=k, weights="uniform", metric="cosine").fit(train, labels)
    # vote ties: both pick the lowest class index (argmax / scipy mode)
    np.testing.assert_array_equal(scores[k].argmax(dim=1).numpy(), reference.predict(query))


def test_weighted_predictions_match_sklearn_callable_weights() -> None:
    train, labels = blobs(80, spread=2.5)
    query, query_labels = blobs(40, spread=2.5, seed=3)
    temperature = 0.07
    # sklearn's cosine distance is 1 - similarity, so the protocol's weight is exp((1 - d) / T)
    reference = KNeighborsClassifier(
        n_neighbors=10, weights=lambda d: np.exp((1.0 - d) / temperature), metric="cosine"
    ).fit(train, labels)
    scores = knn_class_scores(
        F.normalize(torch.from_numpy(train), dim=1),
        torch.from_numpy(labels),
        F.normalize(torch.from_numpy(query), dim=1),
        ks=(10,),
        num_classes=4,
        temperature=temperature,
    )
    np.testing.assert_array_equal(scores[10].argmax(dim=1).numpy(), reference.predict(query))
    result = run_knn(
        Features.from_array(train, labels), Features.from_array(query, query_labels), KnnConfig(ks=(10,), device="cpu")
    )
    assert result.scores[0].top1 == pytest.approx(100.0 * np.mean(reference.predict(query) == query_labels))


def test_chunking_does_not_change_results() -> None:
    train, labels = blobs(50)
    query, query_labels = blobs(23, seed=2)
    args = (
        torch.from_numpy(train),
        torch.from_numpy(labels),
        torch.from_numpy(query),
        torch.from_numpy(query_labels),
        (1, 10, 50),
        4,
    )
    assert knn_accuracy(*args, chunk_size=4) == knn_accuracy(*args)


def test_k_is_capped_at_train_size() -> None:
    train, labels = blobs(30)
    query, query_labels = blobs(10, seed=4)
    result = run_knn(
        Features.from_array(train, labels),
        Features.from_array(query, query_labels),
        KnnConfig(ks=(10, 100, 200), device="cpu"),
    )
    assert [s.k for s in result.scores] == [10, 30]
    expected = naive_knn_scores(train, labels, query, 30, 4, 0.07).argmax(axis=1)
    assert result.scores[1].top1 == pytest.approx(100.0 * np.mean(expected == query_labels))


def test_few_shot_averages_independent_draws() -> None:
    train, labels = blobs(120, spread=2.5)
    query, query_labels = blobs(30, spread=2.5, seed=5)
    config = KnnConfig(ks=(1, 3, 10), few_shot=(3,), tries=4, seed=7, device="cpu")
    result = run_knn(Features.from_array(train, labels), Features.from_array(query, query_labels), config)
    few = [s for s in result.scores if s.n_per_class == 3]
    assert [s.k for s in few] == [1, 3]  # as the official code: ks up to the shot count, plus the shot count
    per_try = []
    for t in range(4):
        chosen = sample_per_class(labels, 3, seed=7 + t)
        assert np.all(np.bincount(labels[chosen], minlength=4) == 3)
        preds = naive_knn_scores(train[chosen], labels[chosen], query, 3, 4, 0.07).argmax(axis=1)
        per_try.append(100.0 * np.mean(preds == query_labels))
    assert few[1].top1 == pytest.approx(np.mean(per_try))
    assert few[1].top1_std == pytest.approx(np.std(per_try, ddof=1))
    assert few[1].tries == 4


def test_top5_matches_sklearn_top_k_accuracy() -> None:
    from sklearn.metrics import top_k_accuracy_score

    train, labels = blobs(60, num_classes=12, spread=3.0)
    query, query_labels = blobs(25, num_classes=12, spread=3.0, seed=6)
    # k = all neighbours: every class gets a distinct non-zero vote, so no ties decide the top 5
    accuracies = knn_accuracy(
        torch.from_numpy(train),
        torch.from_numpy(labels),
        torch.from_numpy(query),
        torch.from_numpy(query_labels),
        (60,),
        12,
    )
    expected = naive_knn_scores(train, labels, query, 60, 12, 0.07)
    assert accuracies[60][1] == pytest.approx(
        100.0 * top_k_accuracy_score(query_labels, expected, k=5, labels=np.arange(12))
    )
    assert accuracies[60][0] == pytest.approx(100.0 * np.mean(expected.argmax(axis=1) == query_labels))
