"""embed_images: features must equal a direct forward pass of the model on the same transformed image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.data.images import load_rgb
from dinolab.data.transforms import make_eval_transform, make_resize_transform
from dinolab.features import Resolution, embed_images, parse_image_size
from dinolab.models.vit import vit_tiny


def write_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Three readable images of different sizes and formats, a corrupt one and a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for name, size in (("a.png", (70, 90)), ("b.jpg", (64, 64)), ("c.png", (100, 60))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
        good.append(folder / name)
    (folder / "corrupt.jpg").write_bytes(rng.bytes(400))
    jpeg = (folder / "b.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return sorted(good), [folder / "corrupt.jpg", folder / "truncated.jpg"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_tiny(depth=2, img_size=56).eval()


def direct(model: torch.nn.Module, paths: list[Path], transform) -> dict[str, np.ndarray]:
    images = torch.stack([transform(load_rgb(p)) for p in paths])
    with torch.inference_mode():
        out = model.forward_features(images)
        return {
            "cls": model(images).numpy(),
            "patch_pooled": out["x_norm_patchtokens"].mean(1).numpy(),
            "patch_tokens": out["x_norm_patchtokens"].numpy(),
            "registers": out["x_norm_regtokens"].numpy(),
        }


def test_features_equal_direct_forward_and_failures_are_listed(tmp_path: Path, model: torch.nn.Module) -> None:
    good, bad = write_images(tmp_path / "images")
    result = embed_images(
        model,
        [tmp_path / "images"],
        outputs=("cls", "patch_pooled", "patch_tokens"),
        resolution=Resolution(resize=64, crop=56),
        batch_size=2,  # batches mixing good and bad files
        num_workers=0,
        progress=False,
    )
    assert result.paths == good
    assert [path for path, _ in result.failed] == bad
    assert "cannot identify image" in result.failed[0][1] and "truncated" in result.failed[1][1]
    expected = direct(model, good, make_eval_transform(64, 56))
    for name in ("cls", "patch_pooled", "patch_tokens"):
        np.testing.assert_allclose(result.features[name], expected[name], rtol=1e-5, atol=1e-5)
    assert result.features["patch_tokens"].shape == (3, 16, 192)
    assert result.input_size == (56, 56) and result.patch_grid == (4, 4)
    assert result.num_requested == 5 and result.images_per_s > 0


def test_whole_image_resize_and_registers(tmp_path: Path) -> None:
    write_images(tmp_path / "images")
    torch.manual_seed(1)
    model = vit_tiny(depth=1, img_size=56, num_register_tokens=4).eval()
    list_file = tmp_path / "list.txt"
    list_file.write_text("images/c.png\nimages/a.png\n")  # relative to the list's folder, order kept
    result = embed_images(
        model,
        [list_file],
        outputs=("registers", "cls", "patch_tokens"),
        resolution=Resolution(mode="resize", height=42, width=70),
        num_workers=0,
        progress=False,
    )
    assert result.paths == [tmp_path / "images/c.png", tmp_path / "images/a.png"]
    assert list(result.features) == ["cls", "patch_tokens", "registers"]
    expected = direct(model, result.paths, make_resize_transform(42, 70))
    for name in ("cls", "patch_tokens", "registers"):
        np.testing.assert_allclose(result.features[name], expected[name], rtol=1e-5, atol=1e-5)
    assert result.patch_grid == (3, 5) and result.features["registers"].shape == (2, 4, 192)


def test_bf16_autocast_stays_close_to_fp32(tmp_path: Path, model: torch.nn.Module) -> None:
    good, _ = write_images(tmp_path / "images")
    kwargs = dict(resolution=Resolution(resize=64, crop=56), num_workers=0, progress=False)
    fp32 = embed_images(model, good, dtype="fp32", **kwargs).features["cls"]
    bf16 = embed_images(model, good, dtype="bf16", **kwargs).features["cls"]
    assert bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(fp32, bf16)  # autocast really ran in lower precision


def test_only_unreadable_images_give_empty_arrays(tmp_path: Path, model: torch.nn.Module) -> None:
    _, bad = write_images(tmp_path / "images")
    result = embed_images(
        model,
        bad,
        outputs=("cls", "patch_tokens"),
        resolution=Resolution(resize=64, crop=56),
        num_workers=0,
        progress=False,
    )
    assert result.paths == [] and len(result.failed) == 2
    assert result.features["cls"].shape == (0, 192) and result.features["patch_tokens"].shape == (0, 16, 192)


def test_bad_requests_fail_with_clear_messages(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="multiple of the model's patch size 14"):
        Resolution(mode="resize", height=50, width=56).check_patch_size(14)
    with pytest.raises(ValueError, match="--crop 200"):
        Resolution(resize=256, crop=200).check_patch_size(14)
    with pytest.raises(ValueError, match="crop 300 is larger than resize 256"):
        Resolution(resize=256, crop=300)
    with pytest.raises(ValueError, match="no register tokens"):
        embed_images(model, [], outputs=("registers",), progress=False)
    with pytest.raises(ValueError, match="unknown output"):
        embed_images(model, [], outputs=("cls", "attention"), progress=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        embed_images(model, [], dtype="fp8", progress=False)


@pytest.mark.parametrize(
    ("text", "size"), [("448", (448, 448)), ("448x672", (448, 672)), ("224X336", (224, 336)), (" 56 ", (56, 56))]
)
def test_parse_image_size(text: str, size: tuple[int, int]) -> None:
    assert parse_image_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "448x", "1x2x3", "0", "-14", "14.5"])
def test_parse_image_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="image size"):
        parse_image_size(text)
