"""``dinolab embed`` and ``dinolab pca`` end to end on generated images, corrupt and truncated files included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from dinolab.cli.main import main
from dinolab.data.images import load_rgb
from dinolab.data.transforms import make_eval_transform
from dinolab.features import read_parquet_features
from dinolab.hub import load_backbone, save_safetensors
from dinolab.models.vit import vit_tiny


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``images/`` with a PNG, a JPEG, a nested PNG, a corrupt ``.jpg`` (random bytes) and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("data") / "images"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(folder / "nested" / "c.png")
    (folder / "corrupt.jpg").write_bytes(rng.bytes(500))
    jpeg = (folder / "b.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block ViT-Ti/14 saved as a checkpoint file, so the test can rebuild the very same model."""
    torch.manual_seed(0)
    return save_safetensors(vit_tiny(depth=2, img_size=56), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def embed(model: str | Path, *args: str | Path) -> int:
    return main(["embed", "--model", str(model), *map(str, args), "--num-workers", "0", "--no-progress"])


def test_embed_end_to_end(images: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    formats = ["--format", "npy", "--format", "parquet", "--format", "safetensors"]
    code = embed(checkpoint, images, "-o", out, "--resize", "64", "--crop", "56", "--patch-pooled", *formats)
    assert code == 0
    err = capsys.readouterr().err
    assert "2 of 5 images could not be read" in err and "corrupt.jpg" in err and "truncated.jpg" in err

    paths = [Path(p) for p in (out / "paths.txt").read_text().splitlines()]
    assert paths == [images / "a.png", images / "b.jpg", images / "nested" / "c.png"]
    failed = [line.split("\t") for line in (out / "failed.txt").read_text().splitlines()]
    assert [Path(p) for p, _ in failed] == [images / "corrupt.jpg", images / "truncated.jpg"]
    assert all(error for _, error in failed)

    cls, pooled = np.load(out / "cls.npy"), np.load(out / "patch_pooled.npy")
    assert cls.shape == pooled.shape == (3, 192)
    model = load_backbone(checkpoint)
    transform = make_eval_transform(64, 56)
    with torch.inference_mode():
        for row, path in enumerate(paths):
            image = transform(load_rgb(path)).unsqueeze(0)
            np.testing.assert_allclose(cls[row], model(image)[0].numpy(), rtol=1e-5, atol=1e-5)
            patches = model.forward_features(image)["x_norm_patchtokens"][0]
            np.testing.assert_allclose(pooled[row], patches.mean(0).numpy(), rtol=1e-5, atol=1e-5)

    parquet_paths, parquet = read_parquet_features(out / "embeddings.parquet")
    assert [Path(p) for p in parquet_paths] == paths
    np.testing.assert_array_equal(parquet["cls"], cls)
    np.testing.assert_array_equal(load_file(str(out / "embeddings.safetensors"))["patch_pooled"], pooled)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"requested": 5, "embedded": 3, "failed": 2}
    assert summary["outputs"] == {"cls": [3, 192], "patch_pooled": [3, 192]}
    assert summary["input_size"] == [56, 56] and summary["compute_dtype"] == "fp32"
    assert summary["images_per_s"] > 0 and summary["timing"]["embed_s"] > 0
    assert {item["path"] for item in summary["failed"]} == {str(images / "corrupt.jpg"), str(images / "truncated.jpg")}


def test_embed_patch_tokens_from_a_path_list(
    images: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'nested' / 'c.png'}\n# a comment\n{images / 'a.png'}\n")
    out = tmp_path / "out"
    assert embed(checkpoint, listing, "-o", out, "--image-size", "42x56", "--patch-tokens") == 0
    assert "warning: --patch-tokens" in capsys.readouterr().err
    assert (out / "paths.txt").read_text().splitlines() == [str(images / "nested" / "c.png"), str(images / "a.png")]
    assert np.load(out / "patch_tokens.npy").shape == (2, 3 * 4, 192)
    assert (out / "failed.txt").read_text() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-size", "50x56"], "must be a multiple of the model's patch size 14"),
        (["--image-size", "big"], "not H or HxW"),
        (["--image-size", "56", "--crop", "56"], "cannot be combined with --resize / --crop"),
        (["--crop", "100", "--resize", "128"], "--crop 100"),
        (["--registers"], "no register tokens"),
        (["--weights", "w.pth"], "--weights applies to released model names"),
    ],
)
def test_embed_bad_options_fail_clearly(
    images: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert embed(checkpoint, images, "-o", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinolab embed: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_embed_missing_input_fails_clearly(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embed(checkpoint, tmp_path / "nowhere", "-o", tmp_path / "out") == 2
    assert "neither an image file, a folder nor a .txt list" in capsys.readouterr().err


def test_pca_writes_pictures(
    images: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pca"
    code = main(
        [
            "pca",
            "--model",
            str(checkpoint),
            str(images),
            "-o",
            str(out),
            "--image-size",
            "56",
            "--attention",
            "--no-progress",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:03d}_{s}_{kind}.png" for i, s in enumerate(["a", "b", "c"]) for kind in ("attention", "pca")]
    assert Image.open(out / "000_a_pca.png").size == (2 * 56 + 4, 56)
    assert Image.open(out / "000_a_attention.png").size == (5 * 56 + 4 * 4, 56)  # input, mean, 3 heads
    assert len((out / "failed.txt").read_text().splitlines()) == 2
    assert "2 of 5 images could not be read" in capsys.readouterr().err
