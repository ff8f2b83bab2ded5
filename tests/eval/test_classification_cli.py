"""``dinolab eval knn | linear | logreg`` end to end on digit images with a random 2-block ViT-Ti."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

import dinolab.cli.eval as eval_cli
from dinolab.eval.features import Features
from dinolab.eval.knn import KnnConfig, run_knn


def dinolab_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dinolab eval")
    eval_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return args._run(args)


def common(train: Path, val: Path | None, out: Path, cache: Path) -> list[str]:
    sets = ["--train", str(train)] + (["--val", str(val)] if val is not None else [])
    return [
        "--model",
        "vit_tiny",
        "--model-arg",
        "depth=2",
        "--model-arg",
        "img_size=28",
        *sets,
        "--output",
        str(out),
        "--resize",
        "28",
        "--crop",
        "28",
        "--batch-size",
        "64",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]


def test_knn_cli_writes_results_and_matches_library(digits_dirs, tmp_path: Path, capsys) -> None:
    train, val = digits_dirs
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert dinolab_eval(["knn", *common(train, val, out, cache), "--few-shot", "2", "--tries", "2"]) == 0
    printed = capsys.readouterr().out
    assert "k-NN on val" in printed and "| full | 10 |" in printed
    result = json.loads((out / "knn.json").read_text())
    assert (out / "knn.md").read_text().startswith("### k-NN on val")
    scores = result["knn"][0]["scores"]
    assert [(s["k"], s["n_per_class"]) for s in scores] == [(10, None), (20, None), (100, None), (120, None), (2, 2)]
    assert result["knn"][0]["num_train"] == 120 and result["knn"][0]["num_eval"] == 40

    # the same numbers from the cached features through the library
    cached = sorted(cache.glob("*.npz"))
    assert len(cached) == 2
    loaded = {}
    for path in cached:
        with np.load(path) as archive:
            loaded[path.name.split("-")[0]] = archive["cls"]
    labels_train = np.repeat(np.arange(10), 12)
    labels_val = np.repeat(np.arange(10), 4)
    library = run_knn(
        Features(labels_train, loaded["train"], [str(i) for i in range(10)]),
        Features(labels_val, loaded["val"], [str(i) for i in range(10)]),
        KnnConfig(device="cpu"),
    )
    assert [s.top1 for s in library.scores] == pytest.approx([s["top1"] for s in scores[:4]])

    # precomputed embeddings of the same sets give the same result, without a model
    np.savez(tmp_path / "train.npz", features=loaded["train"][:, -1], labels=labels_train)
    np.savez(tmp_path / "val.npz", features=loaded["val"][:, -1], labels=labels_val)
    out2 = tmp_path / "out2"
    assert (
        dinolab_eval(
            [
                "knn",
                "--train",
                str(tmp_path / "train.npz"),
                "--val",
                str(tmp_path / "val.npz"),
                "--output",
                str(out2),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    again = json.loads((out2 / "knn.json").read_text())["knn"][0]["scores"]
    assert [s["top1"] for s in again[:4]] == pytest.approx([s["top1"] for s in scores[:4]])


def test_linear_cli(digits_dirs, tmp_path: Path) -> None:
    train, val = digits_dirs
    out = tmp_path / "out"
    argv = ["linear", *common(train, val, out, tmp_path / "cache"), "--epochs", "3", "--train-batch-size", "32"]
    assert dinolab_eval(argv) == 0
    result = json.loads((out / "linear.json").read_text())["linear"]
    assert len(result["heads"]) == 4 * 13  # last 1 / last 2 (= all blocks of the depth-2 model) x avgpool x 13
    assert result["selection_set"] == "val" and result["iterations"] == 3 * (120 // 32)
    assert result["evals"]["val"]["top1"] == pytest.approx(result["best"]["selection_top1"])
    assert "### Linear probe" in (out / "linear.md").read_text()


def test_logreg_cli_with_broken_image_and_split_val(digits_dirs, tmp_path: Path) -> None:
    train, _ = digits_dirs
    broken = train / "0" / "zz_broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    try:
        out = tmp_path / "out"
        argv = ["logreg", *common(train, None, out, tmp_path / "cache"), "--c-grid-size", "6", "--max-iter", "200"]
        assert dinolab_eval(argv) == 0
    finally:
        broken.unlink()
    report = json.loads((out / "logreg.json").read_text())
    result = report["logreg"]
    assert len(result["sweep"]) == 6 and result["best_C"] in [s["C"] for s in result["sweep"]]
    assert list(result["evals"]) == ["train val split (10%)"]
    failures = report["failures"]["train"]
    assert len(failures) == 1 and failures[0][0] == str(broken)
    assert "Unreadable images" in (out / "logreg.md").read_text()


def test_images_need_a_model(digits_dirs, tmp_path: Path) -> None:
    train, val = digits_dirs
    with pytest.raises(SystemExit, match="--model is needed"):
        dinolab_eval(["knn", "--train", str(train), "--val", str(val), "--output", str(tmp_path)])
