"""End-to-end runs of ``dinolab eval segmentation`` / ``depth`` on real pictures shipped with scikit-image:
the stereo pair's disparity as a depth target, the coins image thresholded as a segmentation mask.
Smoke tests: they train a few steps, score, and write the result file and the pictures."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from dense_helpers import write_gray, write_rgb
from skimage import data as skdata
from skimage.filters import threshold_otsu

from dinolab.cli import eval_depth, eval_segmentation

TINY_BACKBONE = ["--model", "vit_tiny", "--model-arg", "depth=2", "--model-arg", "img_size=56"]
FAST = ["--num-workers", "0", "--no-progress", "--seed", "0"]


def run_cli(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def write_stereo_depth_folder(root) -> None:
    """The left view of skimage's motorcycle pair (1/4 size) with its disparity (pixels) as the target map."""
    left, _, disparity = skdata.stereo_motorcycle()
    left, disparity = left[::4, ::4], disparity[::4, ::4] / 4  # disparity scales with the image width
    write_rgb(root / "images" / "motorcycle.png", left)
    (root / "depths").mkdir(parents=True)
    np.save(root / "depths" / "motorcycle.npy", np.where(np.isfinite(disparity), disparity, 0).astype(np.float32))


def test_depth_end_to_end_on_the_stereo_pair(tmp_path) -> None:
    write_stereo_depth_folder(tmp_path / "data")
    images, depths = str(tmp_path / "data" / "images"), str(tmp_path / "data" / "depths")
    out = tmp_path / "report"
    argv = [
        "--dataset", "folder", "--train-images", images, "--train-depths", depths, "--val-images", images,
        "--val-depths", depths, "--min-depth", "0.5", "--max-depth", "20", "--iters", "30", "--batch-size", "2",
        "--sig-warmup-iters", "5",
        "--crop-size", "56", "56", "--lr", "0.03", "--bins", "64", "--window", "56", "--stride", "42",
        "--output", str(out), *TINY_BACKBONE, *FAST,
    ]  # fmt: skip
    assert run_cli(eval_depth, argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "depth" and record["results"]["num_images"] == 1
    assert np.isfinite(record["results"]["rmse"]) and 0 <= record["results"]["delta1"] <= 1
    assert record["train_loss"]["end_mean"] < record["train_loss"]["start_mean"]
    pictures = list((out / "pictures").glob("depth_*.png"))
    assert len(pictures) == 1 and pictures[0].stat().st_size > 1000
    # the saved head reloads (released layout) and gives the same scores without training
    again = tmp_path / "reloaded"
    reload_argv = [a if a != str(out) else str(again) for a in argv] + ["--head", str(out / "head.pth")]
    assert run_cli(eval_depth, reload_argv) == 0
    reloaded = json.loads((again / "results.json").read_text())["results"]
    assert reloaded["rmse"] == pytest.approx(record["results"]["rmse"], rel=1e-4)


def write_coins_folder(root) -> None:
    """skimage's coins (1/2 size) with the Otsu threshold as a two-class mask (coin = 1)."""
    coins = skdata.coins()[::2, ::2]
    mask = (coins > threshold_otsu(coins)).astype(np.uint8)
    write_rgb(root / "images" / "coins.png", np.repeat(coins[:, :, None], 3, axis=2))
    write_gray(root / "masks" / "coins.png", mask)


def test_segmentation_end_to_end_on_coins(tmp_path) -> None:
    write_coins_folder(tmp_path / "data")
    images, masks = str(tmp_path / "data" / "images"), str(tmp_path / "data" / "masks")
    out = tmp_path / "report"
    argv = [
        "--dataset", "folder", "--train-images", images, "--train-masks", masks, "--val-images", images,
        "--val-masks", masks, "--num-classes", "2", "--iters", "25", "--batch-size", "4", "--lr", "0.01",
        "--warmup-iters", "0", "--crop-size", "56", "--scale", "192", "152", "--ratio-range", "0.5", "1.0",
        "--window", "56", "--stride", "42", "--test-short-side", "0", "--output", str(out), *TINY_BACKBONE, *FAST,
    ]  # fmt: skip
    assert run_cli(eval_segmentation, argv) == 0
    record = json.loads((out / "results.json").read_text())
    results = record["results"]
    assert record["task"] == "segmentation" and set(results["per_class_IoU"]) == {"class_0", "class_1"}
    assert 0 < results["mIoU"] <= 1 and results["aAcc"] > 0.5
    assert record["train_loss"]["end_mean"] < record["train_loss"]["start_mean"]
    pictures = list((out / "pictures").glob("segmentation_*.png"))
    assert len(pictures) == 1 and pictures[0].stat().st_size > 1000
    again = tmp_path / "reloaded"
    eval_only = [
        "--dataset", "folder", "--val-images", images, "--val-masks", masks, "--num-classes", "2",
        "--head", str(out / "head.pth"), "--window", "56", "--stride", "42", "--test-short-side", "0",
        "--output", str(again), *TINY_BACKBONE, *FAST,
    ]  # fmt: skip
    assert run_cli(eval_segmentation, eval_only) == 0
    reloaded = json.loads((again / "results.json").read_text())["results"]
    assert reloaded["mIoU"] == pytest.approx(results["mIoU"])
