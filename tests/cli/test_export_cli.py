"""``dinolab export``: every kind of source (run directory, released name with --weights, checkpoint file) to
every kind of target, through the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli.main import main
from dinolab.hub import load_backbone, make_dinov2_model, save_safetensors
from dinolab.models import build_vit


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinolab.config import apply_overrides
    from dinolab.train.loop import train
    from dinolab.train.recipes import get_recipe

    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    out = tmp_path_factory.mktemp("run")
    assert train(apply_overrides(get_recipe("test_tiny"), [f"run.data={images}", f"run.output_dir={out}"])).finished
    return out


def test_run_directory_exports_as_before_and_to_other_formats(finished_run: Path, tmp_path: Path, capsys) -> None:
    from dinolab.train.loop import load_run_backbone

    backbone = load_run_backbone(finished_run)
    assert main(["export", str(finished_run), "--output", str(tmp_path / "teacher.pth")]) == 0  # the original usage
    exported = load_backbone(tmp_path / "teacher.pth")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in backbone.state_dict().items())
    assert main(["export", "--model", str(finished_run), "--output", str(tmp_path / "teacher.ts")]) == 0
    assert "max |export - source|" in capsys.readouterr().out
    assert (tmp_path / "teacher.ts").is_file()


def test_checkpoint_file_to_hugging_face_and_back(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    checkpoint = save_safetensors(
        build_vit("vit_small", depth=2, img_size=56, num_register_tokens=4), tmp_path / "m.safetensors"
    )
    assert (
        main(
            [
                "export",
                "--model",
                str(checkpoint),
                "--output",
                str(tmp_path / "hf"),
                "--check-size",
                "56",
                "--check-size",
                "42x70",
            ]
        )
        == 0
    )
    assert "1x56x56" in capsys.readouterr().out
    assert (
        main(["export", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "again.safetensors")]) == 0
    )  # HF dir as source
    again, source = load_backbone(tmp_path / "again.safetensors"), load_backbone(checkpoint)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in source.state_dict().items())


def test_released_name_with_weights_and_explicit_timm_format(tmp_path: Path) -> None:
    weights = save_safetensors(make_dinov2_model("dinov2_vits14", pretrained=False), tmp_path / "w.safetensors")
    out = tmp_path / "timm.safetensors"
    code = main(["export", "--model", "dinov2_vits14", "--weights", str(weights), "--output", str(out), "--format", "timm",
                 "--check-size", "98", "--check-size", "70x112"])  # fmt: skip
    assert code == 0 and out.is_file()


def test_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.pth")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["export", "--model", "vit_tiny", "--output", str(tmp_path / "x.pth"), "--format", "timm"]) == 2
    assert "timm has DINOv2 models for ViT-S, B, L and g only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
