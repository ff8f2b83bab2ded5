"""Logistic regression: the chosen C equals a brute-force scikit-learn sweep on the same split; the refit and
the scores follow; the torch L-BFGS backend reaches scikit-learn's optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from dinolab.eval.features import Features
from dinolab.eval.logreg import LogRegConfig, c_grid, fit_sklearn, fit_torch, run_logreg, select_c
from dinolab.eval.readers.classification import stratified_split


def noisy_blobs(n: int, seed: int, num_classes: int = 3, dim: int = 5, name: str = "") -> Features:
    rng = np.random.default_rng(seed)
    centers = 1.2 * np.random.default_rng(99).normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    features = centers[labels] + rng.normal(size=(n, dim))  # overlapping classes: accuracy depends on C
    return Features.from_array(features, labels, [str(c) for c in range(num_classes)], name or f"set{seed}")


def test_grid_is_the_official_one() -> None:
    official = (10 ** torch.linspace(-6, 5, 45)).double().numpy()
    np.testing.assert_allclose(c_grid(45), official, rtol=1e-6)


def test_chosen_c_equals_brute_force_sklearn() -> None:
    train, val = noisy_blobs(150, seed=0), noisy_blobs(60, seed=1)
    config = LogRegConfig(progress=False, seed=3)
    result = run_logreg(train, val, [], config)

    kept, held = stratified_split(train.labels, 0.1, seed=3)
    x, y = train.last_cls.astype(np.float64), train.labels
    accuracies = []
    for C in 10.0 ** np.linspace(-6, 5, 45):
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=1e-12).fit(x[kept], y[kept])
        accuracies.append(100.0 * model.score(x[held], y[held]))
    best_C = 10.0 ** np.linspace(-6, 5, 45)[int(np.argmax(accuracies))]  # first maximum = smallest C
    assert result.best_C == pytest.approx(best_C)
    assert [s.selection_top1 for s in result.sweep] == pytest.approx(accuracies)
    final = LogisticRegression(C=best_C, solver="lbfgs", max_iter=1000, tol=1e-12).fit(x, y)
    assert result.evals[val.name].top1 == pytest.approx(
        100.0 * final.score(val.last_cls.astype(np.float64), val.labels)
    )
    assert len(set(accuracies)) > 2  # the data make the choice of C matter


def test_coarse_to_fine_fits_fewer_and_refines_around_the_coarse_best() -> None:
    train = noisy_blobs(150, seed=2)
    kept, held = stratified_split(train.labels, 0.2, seed=0)
    x, y = train.last_cls.astype(np.float64), train.labels
    _, full = select_c(x[kept], y[kept], x[held], y[held], 3, LogRegConfig(progress=False))
    c, sweep = select_c(
        x[kept], y[kept], x[held], y[held], 3, LogRegConfig(search="coarse-to-fine", coarse_stride=4, progress=False)
    )
    assert len(sweep) < len(full)
    full_scores = np.array([s.selection_top1 for s in full])
    grid = c_grid(45)
    for s in sweep:  # every evaluated point is a point of the full grid, with the same score
        index = int(np.argmin(np.abs(np.log10(grid) - np.log10(s.C))))
        assert grid[index] == pytest.approx(s.C) and full_scores[index] == pytest.approx(s.selection_top1)
    best = next(s for s in sweep if c == s.C)
    assert best.selection_top1 == max(s.selection_top1 for s in sweep)
    # the fine pass fits the full-grid neighbours of the coarse best (every 4th C, and the last)
    coarse = [i for i in range(45) if i % 4 == 0 or i == 44]
    coarse_best = max(coarse, key=lambda i: (full_scores[i], -i))
    evaluated = {int(np.argmin(np.abs(grid - s.C))) for s in sweep}
    assert set(range(max(0, coarse_best - 3), min(45, coarse_best + 4))) <= evaluated


def test_torch_lbfgs_reaches_sklearn_optimum() -> None:
    data = noisy_blobs(120, seed=4)
    x, y = data.last_cls.astype(np.float64), data.labels
    for C in (0.05, 2.0):
        expected = fit_sklearn(x, y, C, 3)(x)
        got = fit_torch(x, y, C, 3, max_iter=500, tol=1e-10, device=torch.device("cpu"))(x)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_selection_on_val_and_classes_missing_from_train() -> None:
    train, val = noisy_blobs(90, seed=5), noisy_blobs(30, seed=6)
    wide = Features(val.labels, val.cls, ["0", "1", "2", "3"], None, "val4")  # a class train never saw
    result = run_logreg(train, wide, [], LogRegConfig(c_grid_size=5, select_on_val=True, progress=False))
    assert result.selection_set == "val4" and len(result.sweep) == 5
    with pytest.raises(ValueError, match="validation or test set"):
        run_logreg(train, None, [], LogRegConfig(progress=False))
