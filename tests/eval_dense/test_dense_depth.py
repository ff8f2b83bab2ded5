"""Depth: losses against naive formulas, metrics against per-pixel loops, crops, augmentation, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dense_helpers import write_rgb

from dinolab.eval import depth as dep
from dinolab.eval.dense import DenseEvaluation
from dinolab.eval.heads import Depther, make_depth_head
from dinolab.eval.readers.depth import folder_pair


def test_sigloss_matches_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 1, 5, 6, generator=g) * 5 + 0.1
    target = torch.rand(2, 1, 5, 6, generator=g) * 5
    target[0, 0, 0, :3] = 0
    valid = target > 0
    p, t = pred[valid].double().tolist(), target[valid].double().tolist()
    diffs = [math.log(a + 1e-3) - math.log(b + 1e-3) for a, b in zip(p, t)]
    n = len(diffs)
    mean = sum(diffs) / n
    unbiased_var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    expected = math.sqrt(unbiased_var + 0.15 * mean**2)
    assert float(dep.sigloss(pred, target, valid)) == pytest.approx(expected, rel=1e-5)
    assert float(dep.sigloss(pred, target, valid, warm_up=True)) == pytest.approx(math.sqrt(0.15 * mean**2), rel=1e-5)
    # with N large the unbiased variance is Eigen's sqrt(mean g^2 - 0.85 mean(g)^2)
    eigen = math.sqrt(sum(d * d for d in diffs) / n - 0.85 * mean**2)
    assert float(dep.sigloss(pred, target, valid)) == pytest.approx(eigen, rel=0.05)


def test_gradient_loss_matches_a_pixel_loop() -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 1, 9, 11, generator=g) + 0.5
    target = torch.rand(2, 1, 9, 11, generator=g) + 0.5
    target[0, 0, 2:4, 3:7] = 0
    valid = target > 0
    expected = []
    for b in range(2):
        total = 0.0
        for s in (1, 2, 4, 6):
            p, t, m = pred[b, 0, ::s, ::s], target[b, 0, ::s, ::s], valid[b, 0, ::s, ::s]
            h, w = p.shape
            d = [
                [(math.log(p[y, x] + 1e-3) - math.log(t[y, x] + 1e-3)) * float(m[y, x]) for x in range(w)]
                for y in range(h)
            ]
            acc = 0.0
            for y in range(h):
                for x in range(w):
                    if y + 2 < h and m[y, x] and m[y + 2, x]:
                        acc += abs(d[y][x] - d[y + 2][x])
                    if x + 2 < w and m[y, x] and m[y, x + 2]:
                        acc += abs(d[y][x] - d[y][x + 2])
            total += acc / float(m.sum())
        expected.append(total)
    assert float(dep.gradient_loss(pred, target, valid)) == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_depth_metrics_match_per_pixel_definitions() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 10, size=200)
    pred = gt * rng.uniform(0.6, 1.6, size=200)
    m = dep.depth_metrics(pred, gt)
    n = len(gt)
    for k in (1, 2, 3):
        hits = sum(1 for p, t in zip(pred, gt) if max(p / t, t / p) < 1.25**k)
        assert m[f"delta{k}"] == pytest.approx(hits / n)
    assert m["abs_rel"] == pytest.approx(sum(abs(t - p) / t for p, t in zip(pred, gt)) / n)
    assert m["sq_rel"] == pytest.approx(sum((t - p) ** 2 / t for p, t in zip(pred, gt)) / n)
    assert m["rmse"] == pytest.approx(math.sqrt(sum((t - p) ** 2 for p, t in zip(pred, gt)) / n))
    assert m["rmse_log"] == pytest.approx(
        math.sqrt(sum((math.log(t) - math.log(p)) ** 2 for p, t in zip(pred, gt)) / n)
    )
    assert m["log10"] == pytest.approx(sum(abs(math.log10(t) - math.log10(p)) for p, t in zip(pred, gt)) / n)
    errors = [math.log(p) - math.log(t) for p, t in zip(pred, gt)]
    silog = 100 * math.sqrt(sum(e * e for e in errors) / n - (sum(errors) / n) ** 2)
    assert m["silog"] == pytest.approx(silog)
    perfect = dep.depth_metrics(gt, gt)
    assert perfect["rmse"] == 0 and perfect["delta1"] == 1 and perfect["abs_rel"] == 0


def test_eval_crops() -> None:
    nyu = dep.eval_crop_mask(480, 640, "nyu_eigen")
    rows, cols = np.nonzero(nyu)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (45, 470, 41, 600)
    garg = dep.eval_crop_mask(352, 1216, "kitti_garg")
    rows, cols = np.nonzero(garg)
    assert (rows.min(), rows.max() + 1) == (int(0.40810811 * 352), int(0.99189189 * 352))
    assert (cols.min(), cols.max() + 1) == (int(0.03594771 * 1216), int(0.96405229 * 1216))
    assert dep.eval_crop_mask(3, 4, "none").all()
    with pytest.raises(ValueError, match="crop"):
        dep.eval_crop_mask(3, 4, "eigen")


def _depth_folder(root, count: int, seed: int):
    """Images whose brightness encodes depth: depth = 1 + 3 * red / 255, a few unknown pixels."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        ramp = np.linspace(0, 1, 56)[None, :] if i % 2 else np.linspace(0, 1, 56)[:, None]
        red = (255 * np.broadcast_to(ramp, (56, 56))).astype(np.uint8)
        image = np.stack([red, rng.integers(0, 30, (56, 56)), 255 - red], axis=-1)
        depth = (1 + 3 * red.astype(np.float32) / 255).astype(np.float32)
        depth[rng.random((56, 56)) < 0.05] = 0
        write_rgb(root / "images" / f"{i}.png", image)
        (root / "depths").mkdir(parents=True, exist_ok=True)
        np.save(root / "depths" / f"{i}.npy", depth)
    return folder_pair(root / "images", root / "depths", min_depth=0.5, max_depth=5.0)


def test_augmented_crops_are_padded_with_unknown_depth(tmp_path) -> None:
    data = _depth_folder(tmp_path, 1, 0)
    torch.manual_seed(0)
    aug = dep.DepthAugmentation(crop_size=(60, 70), rotate_degrees=0.0)
    image, depth = dep.DepthTrainDataset(data, aug)[0]
    assert image.shape == (3, 60, 70) and depth.shape == (1, 60, 70)
    assert (
        (depth[:, 56:] == 0).all() and (depth[:, :, 56:] == 0).all() and (depth[:, :56, :56] > 0).float().mean() > 0.9
    )
    rotated = dep.DepthTrainDataset(data, dep.DepthAugmentation(crop_size=(28, 28), rotate_degrees=10.0))
    for _ in range(3):
        image, depth = rotated[0]
        assert image.shape == (3, 28, 28) and float(depth.max()) <= 4.0 + 1e-5


def test_training_reduces_the_loss_and_evaluation_scores(tmp_path, tiny_backbone) -> None:
    train = _depth_folder(tmp_path / "train", 6, 0)
    val = _depth_folder(tmp_path / "val", 2, 1)
    head = make_depth_head(tiny_backbone, blocks=1, n_bins=32, min_depth=0.5, max_depth=5.0, upsample=2)
    model = Depther(tiny_backbone, head, blocks=1)
    config = dep.DepthTrainConfig(iters=30, batch_size=3, lr=3e-2, sig_warmup_iters=0, num_workers=0)
    aug = dep.DepthAugmentation(crop_size=(56, 56), rotate_degrees=0.0, color_prob=0.0)
    losses = dep.train_depth(model, dep.DepthTrainDataset(train, aug), config, progress=False)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    run = DenseEvaluation(picture_dir=tmp_path / "pics", num_pictures=2, num_workers=0, progress=False)
    results = dep.evaluate_depth(model, val, dep.DepthInference(window=42, stride=28), run)
    assert results.num_images == 2 and set(results.metrics) == set(dep.DEPTH_METRICS)
    assert results.metrics["abs_rel"] < 0.5
    assert len(results.pictures) == 2 and all(p.stat().st_size > 0 for p in results.pictures)
