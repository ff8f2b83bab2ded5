"""The quickstart's data, baselines and report (the full run is `make quickstart`, and a slow test here)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dinolab.quickstart.data import TEXTURE_SOURCES, write_digits, write_photos, write_textures
from dinolab.quickstart.report import ScoreRow, results_markdown, write_report
from dinolab.quickstart.run import pixel_features, run_quickstart


def test_digits_are_written_as_a_stratified_image_folder(tmp_path):
    split = write_digits(tmp_path / "digits", size=32)
    assert split.num_train + split.num_val == 1797
    train = sorted(split.train.rglob("*.png"))
    assert len(train) == split.num_train and {p.parent.name for p in train} == {str(d) for d in range(10)}
    assert Image.open(train[0]).size == (32, 32) and Image.open(train[0]).mode == "RGB"
    assert write_digits(tmp_path / "digits") == split  # idempotent


def test_textures_are_patches_of_the_photographs_with_disjoint_train_and_val_regions(tmp_path):
    split = write_textures(tmp_path, train_per_class=4, val_per_class=3)
    assert sorted(p.name for p in split.train.iterdir()) == sorted(TEXTURE_SOURCES)
    assert (split.num_train, split.num_val) == (4 * len(TEXTURE_SOURCES), 3 * len(TEXTURE_SOURCES))
    for folder, count in ((split.train, 4), (split.val, 3)):
        for source in TEXTURE_SOURCES:
            files = sorted((folder / source).glob("*.png"))
            assert len(files) == count and Image.open(files[0]).size == (32, 32)
    again = write_textures(tmp_path / "again", train_per_class=4, val_per_class=3)
    first, second = (sorted((s.val / "brick").glob("*.png"))[0] for s in (split, again))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))  # deterministic


def test_pixel_features_recover_the_original_digits(tmp_path):
    split = write_digits(tmp_path / "digits", size=32)
    paths = sorted(split.val.rglob("*.png"))[:5]
    features = pixel_features(paths)
    assert features.shape == (5, 64)
    np.testing.assert_allclose(features.mean(axis=1), 0, atol=1e-6)
    original = load_digits().images[int(paths[0].stem.split("_")[1])].reshape(-1) / 16.0
    correlation = np.corrcoef(features[0], original - original.mean())[0, 1]
    assert correlation > 0.95  # area-averaging the bicubic upscale gives the 8 x 8 digit back


def test_photos_come_from_scikit_image(tmp_path):
    paths = write_photos(tmp_path)
    assert len(paths) == 6 and all(Image.open(p).mode == "RGB" for p in paths)


def test_report_holds_the_table_and_the_pictures(tmp_path):
    picture = tmp_path / "figures" / "a.png"
    picture.parent.mkdir()
    Image.new("RGB", (4, 4)).save(picture)
    rows = [ScoreRow("teacher", 71.7, 80.9, 85.0), ScoreRow("random", 44.4, 46.5, 77.8)]
    markdown, html = write_report(tmp_path, rows, 20, {"Pictures": [picture]}, ["a note"])
    assert results_markdown(rows, 20) in markdown.read_text()
    assert "figures/a.png" in markdown.read_text() and 'src="figures/a.png"' in html.read_text()
    assert "<td>71.7</td><td>80.9</td><td>85.0</td>" in html.read_text()


@pytest.mark.slow
def test_a_short_quickstart_runs_end_to_end(tmp_path: Path):
    result = run_quickstart(
        tmp_path, ["optim.epochs=1", "optim.iters_per_epoch=15", "run.num_workers=0"], progress=False
    )
    assert [row.name for row in result.rows] == ["DINOv2-pretrained teacher", "same ViT, random init", "raw pixels"]
    assert result.report_html.is_file() and (tmp_path / "figures" / "neighbours.png").is_file()
