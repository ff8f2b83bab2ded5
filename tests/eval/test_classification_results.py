"""Top-k accuracy against scikit-learn; reports on disk; the all-tasks entry point on in-memory features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score

from dinolab.eval import (
    ClassificationReport,
    Features,
    KnnConfig,
    LinearConfig,
    LogRegConfig,
    evaluate_classification,
    write_report,
)
from dinolab.eval.results import accuracy


def test_accuracy_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 8, (50,), generator=g)
    result = accuracy(scores, labels)
    assert result.count == 50
    assert result.top1 == pytest.approx(100.0 * top_k_accuracy_score(labels, scores, k=1, labels=range(8)))
    assert result.top5 == pytest.approx(100.0 * top_k_accuracy_score(labels, scores, k=5, labels=range(8)))
    assert accuracy(scores[:, :3], labels % 3).top5 == 100.0  # fewer than 5 classes: top-all


def blobs(n: int, seed: int, name: str) -> Features:
    rng = np.random.default_rng(seed)
    centers = 5.0 * np.random.default_rng(42).normal(size=(4, 6))
    labels = rng.integers(0, 4, n)
    return Features(
        labels,
        centers[labels][:, None] + rng.normal(size=(n, 2, 6)),
        ["a", "b", "c", "d"],
        rng.normal(size=(n, 6)),
        name,
    )


def test_all_tasks_on_features_and_report_files(tmp_path: Path) -> None:
    train, val, test = blobs(160, 0, "train"), blobs(40, 1, "same"), blobs(40, 2, "same")
    report = evaluate_classification(
        None,
        train,
        val,
        test,
        knn=KnnConfig(ks=(5, 20), device="cpu"),
        linear=LinearConfig(epochs=2, batch_size=32, device="cpu", progress=False),
        logreg=LogRegConfig(c_grid_size=4, max_iter=100, progress=False),
    )
    assert [r.eval_set for r in report.knn] == ["val same", "test same"]  # equal names get their role
    assert list(report.linear.evals) == ["val same", "test same"]
    assert list(report.logreg.evals) == ["val same", "test same"]
    assert report.knn[0].scores[0].top1 > 90.0 and report.logreg.evals["test same"].top1 > 90.0

    markdown = write_report(report, tmp_path, stem="all")
    saved = json.loads((tmp_path / "all.json").read_text())
    assert saved["logreg"]["best_C"] == pytest.approx(report.logreg.best_C)
    assert saved["config"]["linear"]["learning_rates"][0] == 1e-5
    assert (tmp_path / "all.md").read_text() == markdown
    assert (
        "### k-NN on val same" in markdown and "### Linear probe" in markdown and "### Logistic regression" in markdown
    )


def test_test_set_without_val_holds_out_train_for_choices() -> None:
    train, test = blobs(120, 3, "train"), blobs(30, 4, "test")
    report = evaluate_classification(
        None,
        train,
        test=test,
        tasks=("linear", "logreg"),
        linear=LinearConfig(epochs=1, device="cpu", progress=False),
        logreg=LogRegConfig(c_grid_size=3, max_iter=50, progress=False),
    )
    assert "hold-out" in report.linear.selection_set and "hold-out" in report.logreg.selection_set
    assert list(report.logreg.evals) == ["test"] and report.knn == []
    assert isinstance(report, ClassificationReport)
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_classification(None, train, test=test, tasks=("segmentation",))
