"""Segmentation: sliding windows, mIoU, schedule, augmentation and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dense_helpers import two_region_sample, write_gray, write_rgb
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from dinolab.eval import dense
from dinolab.eval import segmentation as seg
from dinolab.eval.dense import DenseEvaluation
from dinolab.eval.heads import Segmenter
from dinolab.eval.readers.segmentation import folder_pair


def test_window_starts_cover_the_side_and_end_at_the_border() -> None:
    assert dense.window_starts(95, 56, 37) == [0, 37, 39]  # the last window is pulled back to end at 95
    assert dense.window_starts(70, 56, 37) == [0, 14]
    assert dense.window_starts(56, 56, 37) == [0]
    assert dense.window_starts(30, 56, 37) == [0]  # smaller than the window: one (clipped) window


def _pixelwise_model(seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 4, kernel_size=1)


@torch.no_grad()
def test_slide_inference_equals_whole_image_for_a_pixelwise_model() -> None:
    model = _pixelwise_model()
    image = torch.randn(2, 3, 70, 95)
    out = dense.slide_inference(model, image, window=56, stride=37, batch_size=3)
    assert out.shape == (2, 4, 70, 95)
    torch.testing.assert_close(out, model(image))
    small = torch.randn(1, 3, 30, 40)
    torch.testing.assert_close(dense.slide_inference(model, small, 56, 37), model(small))


@torch.no_grad()
def test_slide_inference_averages_overlaps_like_a_reference_loop() -> None:
    # a model that is not translation-consistent: each window's output is its own mean, so overlaps matter
    def window_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 2, *x.shape[-2:])

    image = torch.randn(1, 3, 70, 95)
    out = dense.slide_inference(window_mean, image, window=56, stride=37, batch_size=2)
    total, count = torch.zeros(1, 2, 70, 95), torch.zeros(1, 1, 70, 95)
    for y in (0, 14):
        for x in (0, 37, 39):
            total[:, :, y : y + 56, x : x + 56] += image[:, :, y : y + 56, x : x + 56].mean()
            count[:, :, y : y + 56, x : x + 56] += 1
    torch.testing.assert_close(out, total / count)


@torch.no_grad()
def test_flip_averaging_is_softmax_of_logits_for_a_flip_consistent_model() -> None:
    model = _pixelwise_model()
    image = torch.randn(1, 3, 40, 50)
    inference = seg.SegInference(window=28, stride=20, flip=True)
    torch.testing.assert_close(seg.predict_segmentation(model, image, inference), model(image).softmax(1))
    multi = seg.predict_segmentation(model, image, seg.SegInference(window=28, stride=20, scales=(1.0, 1.5)))
    assert multi.shape == (1, 4, 40, 50)
    torch.testing.assert_close(multi.sum(1), torch.ones(1, 40, 50))  # averaged probabilities


def test_miou_matches_a_hand_computed_confusion_matrix() -> None:
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 1], [0, 2, 1, 3]])
    confusion = seg.confusion_matrix(pred, label, num_classes=4)
    valid = label != 255
    np.testing.assert_array_equal(confusion, sk_confusion_matrix(label[valid], pred[valid], labels=range(4)))
    iou, miou = seg.iou_from_confusion(confusion)
    # class 0: tp 2 (label 0 & pred 0), fn 1, fp 1 -> 2/4; class 1: tp 3, fn 0, fp 2 -> 3/5;
    # class 2: tp 2, fn 2, fp 0 -> 2/4; class 3: never labelled nor predicted (its only prediction is ignored)
    np.testing.assert_allclose(iou[:3], [2 / 4, 3 / 5, 2 / 4])
    assert np.isnan(iou[3])
    assert miou == pytest.approx((2 / 4 + 3 / 5 + 2 / 4) / 3)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        seg.confusion_matrix(np.full((2, 2), 4), np.zeros((2, 2)), num_classes=4)


def test_poly_schedule_with_linear_warmup() -> None:
    config = seg.SegTrainConfig(iters=100, lr=1e-3, warmup_iters=10, warmup_ratio=1e-6, min_lr=0.0)
    assert seg.poly_lr_factor(0, config) == pytest.approx(1e-6)
    # step 5: poly 0.95, warm-up factor 1 - 0.5 (1 - 1e-6)
    assert seg.poly_lr_factor(5, config) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert seg.poly_lr_factor(10, config) == pytest.approx(0.9)
    assert seg.poly_lr_factor(100, config) == pytest.approx(0.0)
    squared = seg.SegTrainConfig(iters=100, warmup_iters=0, poly_power=2.0, min_lr=1e-4, lr=1e-3)
    assert seg.poly_lr_factor(50, squared) == pytest.approx(((1e-3 - 1e-4) * 0.25 + 1e-4) / 1e-3)


def _two_region_folder(root, count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, label = two_region_sample(rng)
        write_rgb(root / "images" / f"{i}.png", image)
        write_gray(root / "masks" / f"{i}.png", label)
    return folder_pair(root / "images", root / "masks", num_classes=2)


def test_training_crops_are_padded_with_ignore(tmp_path) -> None:
    data = _two_region_folder(tmp_path, 1, 0)
    torch.manual_seed(0)
    aug = seg.SegAugmentation(crop_size=70, scale=(56, 56), ratio_range=(1.0, 1.0))
    image, label = seg.SegTrainDataset(data, aug)[0]
    assert image.shape == (3, 70, 70) and label.shape == (70, 70)
    assert set(label[:56, :56].unique().tolist()) == {0, 1}
    assert (label[56:] == 255).all() and (label[:, 56:] == 255).all() and (image[:, 56:] == 0).all()
    torch.manual_seed(1)
    small = seg.SegAugmentation(crop_size=28, scale=(112, 112), ratio_range=(0.5, 2.0))
    image, label = seg.SegTrainDataset(data, small)[0]
    assert image.shape == (3, 28, 28) and set(label.unique().tolist()) <= {0, 1}


def test_training_reduces_the_loss_and_evaluation_scores(tmp_path, tiny_backbone) -> None:
    train = _two_region_folder(tmp_path / "train", 8, 0)
    val = _two_region_folder(tmp_path / "val", 2, 1)
    model = Segmenter(tiny_backbone, num_classes=2, blocks=1)
    aug = seg.SegAugmentation(crop_size=56, scale=(56, 56), ratio_range=(1.0, 1.0), photometric=False)
    config = seg.SegTrainConfig(iters=30, batch_size=4, lr=1e-2, warmup_iters=0, num_workers=0)
    losses = seg.train_segmentation(model, seg.SegTrainDataset(train, aug), config, progress=False)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    inference = seg.SegInference(window=42, stride=28, short_side=None)
    run = DenseEvaluation(picture_dir=tmp_path / "pics", num_pictures=1, num_workers=0, progress=False)
    results = seg.evaluate_segmentation(model, val, inference, run)
    _, miou = seg.iou_from_confusion(results.confusion)
    assert results.miou == pytest.approx(miou) and results.confusion.sum() == 2 * 56 * 56
    assert results.miou > 0.5  # two colour regions: far better than chance after training
    assert [p.name for p in results.pictures] == ["segmentation_00000_0.png"] and results.pictures[0].stat().st_size
