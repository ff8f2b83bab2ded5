"""Linear-probe grid: one head's updates equal nn.Linear + torch.optim.SGD + CosineAnnealingLR; the grid trains
every head, picks the best on validation, and separates separable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dinolab.eval.features import Features
from dinolab.eval.linear import (
    LEARNING_RATES,
    FeatureVariant,
    GridSGD,
    LinearConfig,
    LinearGrid,
    grid_top1,
    head_logits,
    linear_scaled_lr,
    run_linear,
)


def synthetic(
    n: int, num_classes: int = 3, dim: int = 6, blocks: int = 4, separation: float = 4.0, seed: int = 0, name: str = ""
) -> Features:
    rng = np.random.default_rng(seed)
    centers = separation * np.random.default_rng(123).normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    cls = centers[labels][:, None] + rng.normal(size=(n, blocks, dim))
    patch_mean = rng.normal(size=(n, dim))
    return Features(labels, cls, [str(c) for c in range(num_classes)], patch_mean, name or f"set{seed}")


def test_official_learning_rates_and_scaling() -> None:
    assert LEARNING_RATES == (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
    assert linear_scaled_lr(1e-3, 1024) == pytest.approx(4e-3)


@pytest.mark.parametrize("variant", [FeatureVariant(1, False), FeatureVariant(2, True)])
def test_one_head_matches_torch_linear_sgd_cosine(variant: FeatureVariant) -> None:
    g = torch.Generator().manual_seed(0)
    batch, blocks, dim, classes, steps = 8, 3, 5, 4, 5
    cls_tokens = torch.randn(steps, batch, blocks, dim, generator=g)
    patch_mean = torch.randn(steps, batch, dim, generator=g)
    labels = torch.randint(0, classes, (steps, batch), generator=g)
    lrs = torch.tensor([0.05, 0.3])
    grid = LinearGrid([variant], dim, heads_per_variant=2, num_classes=classes, generator=g)
    head = 1
    reference = nn.Linear(variant.input_dim(dim), classes)
    with torch.no_grad():
        reference.weight.copy_(grid.weights[0][head])
        reference.bias.copy_(grid.biases[0][head])
    optimizer = torch.optim.SGD(reference.parameters(), lr=lrs[head].item(), momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0)
    grid_sgd = GridSGD(grid, lrs, total_steps=steps, momentum=0.9)
    for t in range(steps):
        # the official input: CLS of the last n blocks in block order, then the mean patch token
        parts = [cls_tokens[t, :, b] for b in range(blocks - variant.n_blocks, blocks)]
        x = torch.cat(parts + ([patch_mean[t]] if variant.avgpool else []), dim=1)
        loss = nn.functional.cross_entropy(reference(x), labels[t])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        grid_sgd.step(cls_tokens[t], patch_mean[t], labels[t])
        torch.testing.assert_close(grid.weights[0][head], reference.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grid.biases[0][head], reference.bias, rtol=1e-5, atol=1e-6)


def test_grid_trains_every_head_and_picks_the_best() -> None:
    train, val, test = (synthetic(n, seed=s, separation=8.0) for n, s in ((240, 0), (90, 1), (90, 2)))
    config = LinearConfig(epochs=4, batch_size=32, device="cpu", progress=False)
    result = run_linear(train, val, [test], config)
    assert len(result.heads) == 4 * 13
    assert [h.variant for h in result.heads[::13]] == [
        "last1_cls",
        "last1_cls+avgpool",
        "last4_cls",
        "last4_cls+avgpool",
    ]
    scores = [h.selection_top1 for h in result.heads]
    assert result.best == result.heads[int(np.argmax(scores))]
    assert result.best.lr == pytest.approx(result.best.base_lr * 32 / 256)
    assert result.evals[val.name].top1 == pytest.approx(result.best.selection_top1)
    assert result.evals[val.name].top1 >= 99.0 and result.evals[test.name].top1 >= 98.0
    assert result.iterations == 4 * (240 // 32)
    assert min(scores) < max(scores)  # the tiniest learning rates barely move from the random init


def test_per_head_accuracy_equals_each_head_alone() -> None:
    features = synthetic(50, seed=3)
    g = torch.Generator().manual_seed(1)
    variants = [FeatureVariant(1, False), FeatureVariant(4, True)]
    grid = LinearGrid(variants, 6, heads_per_variant=3, num_classes=3, generator=g)
    per_head = grid_top1(grid, features, torch.device("cpu"), chunk=7)
    labels = torch.from_numpy(features.labels)
    for head in range(6):
        weight = grid.weights[head // 3][head % 3]
        bias = grid.biases[head // 3][head % 3]
        x = variants[head // 3].build(torch.from_numpy(features.cls), torch.from_numpy(features.patch_mean))
        expected = 100.0 * ((x @ weight.T + bias).argmax(1) == labels).float().mean()
        assert per_head[head].item() == pytest.approx(expected.item())
        torch.testing.assert_close(
            head_logits(grid, features, head, torch.device("cpu"), chunk=7), (x @ weight.T + bias).detach()
        )


def test_holds_out_part_of_train_without_val_and_adapts_variants() -> None:
    train = synthetic(200, blocks=2, seed=4)
    train.patch_mean = None  # e.g. precomputed embeddings: no mean patch token
    result = run_linear(
        train,
        None,
        [synthetic(40, blocks=2, seed=5)],
        LinearConfig(epochs=2, batch_size=50, device="cpu", progress=False),
    )
    assert "hold-out" in result.selection_set
    assert result.num_train == 180
    assert sorted({h.variant for h in result.heads}) == ["last1_cls", "last2_cls"]


def test_augmented_mode_takes_fresh_features_each_epoch() -> None:
    train, val = synthetic(64, seed=6), synthetic(30, seed=7)
    calls = []

    def fresh(epoch: int) -> Features:
        calls.append(epoch)
        noisy = train.cls + np.random.default_rng(epoch).normal(scale=0.1, size=train.cls.shape)
        return Features(train.labels, noisy, train.classes, train.patch_mean, train.name)

    result = run_linear(
        train, val, [], LinearConfig(epochs=3, batch_size=16, device="cpu", progress=False), train_epoch_features=fresh
    )
    assert calls == [0, 1, 2] and result.augmented
