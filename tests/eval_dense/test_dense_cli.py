"""The ``dinolab eval`` registrations and the retrieval / video commands on tiny folder datasets."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from dense_helpers import frame_videos, write_rgb

from dinolab.cli import eval as eval_cli
from dinolab.cli import eval_retrieval, eval_video, options

TINY = ["--model", "vit_tiny", "--model-arg", "depth=2", "--model-arg", "img_size=56",
        "--model-arg", "init_values=1.0", "--num-workers", "0", "--no-progress"]  # fmt: skip


def run_cli(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_tasks_are_registered() -> None:
    tasks = {name: module for name, module, _ in eval_cli.EVAL_TASKS}
    for name in ("segmentation", "depth", "retrieval", "video"):
        assert tasks[name] == f"eval_{name}"


def test_backbone_arguments_are_python_literals() -> None:
    parsed = options.model_kwargs(["depth=2", "init_values=1.0", "ffn_layer=mlp", "img_size=(56)"])
    assert parsed == {"depth": 2, "init_values": 1.0, "ffn_layer": "mlp", "img_size": 56}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        options.model_kwargs(["depth"])


def test_retrieval_command(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        array = rng.integers(0, 255, (40, 50, 3))
        write_rgb(tmp_path / "db" / f"{i}.png", array)
        write_rgb(tmp_path / "q" / f"{i}.png", array[:, ::-1] if i == 3 else array)
    (tmp_path / "rel.tsv").write_text("0.png\t0.png\n1.png\t1.png\n")
    argv = ["--dataset", "folder", "--queries", str(tmp_path / "q"), "--database", str(tmp_path / "db"),
            "--relevance", str(tmp_path / "rel.tsv"), "--image-size", "42", "--multiscale", "--output",
            str(tmp_path / "out"), *TINY]  # fmt: skip
    assert run_cli(eval_retrieval, argv) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["num_queries"] == 2 and record["all"]["mAP"] == pytest.approx(1.0)
    assert record["args"]["multiscale"] is True


def test_video_command(tmp_path) -> None:
    frame_videos(tmp_path / "train", 3, 0)
    frame_videos(tmp_path / "val", 1, 1)
    argv = ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--frames", "3",
            "--resize-size", "28", "--crop-size", "28", "--output", str(tmp_path / "out"), *TINY]  # fmt: skip
    assert run_cli(eval_video, argv) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["num_train"] == 6 and record["num_val"] == 2 and 0 <= record["top1"] <= 1


def test_missing_dataset_options_are_named(tmp_path) -> None:
    with pytest.raises(SystemExit, match="--queries, --database and --relevance"):
        run_cli(eval_retrieval, ["--dataset", "folder", "--output", str(tmp_path), *TINY])
    with pytest.raises(SystemExit, match="--train and --val"):
        run_cli(eval_video, ["--output", str(tmp_path), *TINY])
