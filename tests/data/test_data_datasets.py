"""Unlabelled image datasets (folders, ImageFolder trees, path lists), skipping of unreadable files, and the
end-to-end pretraining DataLoader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.data import (
    AugmentationConfig,
    Batch,
    InfiniteSampler,
    MaskingGenerator,
    MultiCropAugmentation,
    MultiCropCollate,
    StreamIndex,
    TrainSample,
    UnlabeledImageDataset,
    make_pretraining_loader,
)

SMALL = AugmentationConfig(global_size=28, local_size=14, local_crops_number=2)


def _write_image(path: Path, seed: int, size: tuple[int, int] = (36, 44)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _size_of(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.size)


def test_sources_folder_imagefolder_and_path_list(tmp_path: Path) -> None:
    # an ImageFolder tree with mixed formats; labels (class folders) are just sub-folders
    for k, name in enumerate(["cat/a.png", "cat/b.jpg", "dog/c.bmp", "dog/deep/d.webp"]):
        _write_image(tmp_path / "tree" / name, k)
    (tmp_path / "tree" / "notes.txt").write_text("not an image\n")
    tree = UnlabeledImageDataset(tmp_path / "tree", _size_of)
    assert len(tree) == 4
    assert [p.name for p in tree.paths] == ["a.png", "b.jpg", "c.bmp", "d.webp"]
    sample = tree[3]
    assert isinstance(sample, TrainSample) and sample.index == 3 and sample.skipped == []
    assert sample.views.tolist() == [44, 36] and sample.position is None

    # a .txt list of paths, relative to the list's folder, plus a second source
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\ntree/cat/a.png\n\ntree/dog/c.bmp\n")
    both = UnlabeledImageDataset([listing, tmp_path / "tree" / "dog"], _size_of)
    assert [p.name for p in both.paths] == ["a.png", "c.bmp", "c.bmp", "d.webp"]


def test_empty_source_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        UnlabeledImageDataset(tmp_path / "empty", _size_of)
    with pytest.raises(FileNotFoundError):
        UnlabeledImageDataset(tmp_path / "missing", _size_of)


def test_corrupt_files_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for k in range(4):
        _write_image(tmp_path / f"{k}.png", k)
    (tmp_path / "1.png").write_bytes(b"this is not a png")
    truncated = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(truncated[: len(truncated) // 2])
    dataset = UnlabeledImageDataset(tmp_path, _size_of)

    with caplog.at_level(logging.WARNING, logger="dinolab.data.datasets"):
        sample = dataset[1]
    assert sample.index == 3, "moves on to the next readable index"
    assert [path for path, _ in sample.skipped] == [str(tmp_path / "1.png"), str(tmp_path / "2.png")]
    assert all(error for _, error in sample.skipped)
    assert str(tmp_path / "1.png") in caplog.text and str(tmp_path / "2.png") in caplog.text
    assert dataset[0].skipped == [] and dataset[3].index == 3

    # the next index wraps around at the end of the dataset
    (tmp_path / "3.png").write_bytes(b"")
    assert dataset[3].index == 0 and len(dataset[3].skipped) == 1


def test_all_retries_failing_names_the_files(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(b"garbage")
    _write_image(tmp_path / "3.png", 0)
    dataset = UnlabeledImageDataset(tmp_path, _size_of, max_retries=1)
    with pytest.raises(RuntimeError, match=r"0\.jpg(.|\n)*1\.jpg"):
        dataset[0]
    assert UnlabeledImageDataset(tmp_path, _size_of, max_retries=3)[0].index == 3


def test_stream_index_seeds_the_crops_and_leaves_the_global_rng(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.png", 0)
    dataset = UnlabeledImageDataset(tmp_path, MultiCropAugmentation(SMALL))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = dataset[StreamIndex(0, position=5, seed=0)]
    assert torch.equal(torch.get_rng_state(), state), "per-sample seeding must not disturb the caller's RNG"
    again = dataset[StreamIndex(0, position=5, seed=0)]
    other = dataset[StreamIndex(0, position=6, seed=0)]
    assert first.position == 5 and first.seed == 0
    assert all(torch.equal(a, b) for a, b in zip(first.views.global_crops, again.views.global_crops))
    assert not torch.equal(first.views.global_crops[0], other.views.global_crops[0])


def _loader(folder: Path, num_workers: int, start: int) -> torch.utils.data.DataLoader:
    dataset = UnlabeledImageDataset(folder, MultiCropAugmentation(SMALL))
    sampler = InfiniteSampler(len(dataset), seed=7, start=start)
    collate = MultiCropCollate(MaskingGenerator(4), (0.1, 0.5), 0.5)  # 28 px crops, patch 7
    return make_pretraining_loader(dataset, 4, sampler, collate, num_workers=num_workers, seed=7, pin_memory=False)


def test_loader_end_to_end_with_workers_and_exact_resume(tmp_path: Path) -> None:
    for k in range(8):
        _write_image(tmp_path / "images" / f"{k}.png", k)
    (tmp_path / "images" / "3.png").write_bytes(b"corrupt")

    batches = []
    for batch in _loader(tmp_path / "images", num_workers=2, start=0):
        batches.append(batch)
        if len(batches) == 3:
            break
    for step, batch in enumerate(batches):
        assert isinstance(batch, Batch) and batch.num_images == 4
        assert batch.global_crops.shape == (8, 3, 28, 28) and batch.local_crops.shape == (8, 3, 14, 14)
        assert batch.masks.shape == (8, 16) and batch.n_masked_images == 4
        assert batch.positions.tolist() == list(range(4 * step, 4 * step + 4))
    # 3 batches = 12 samples = 1.5 passes over 8 files: the corrupt one was met at least once and reported
    skipped = [path for batch in batches for path, _ in batch.skipped]
    assert skipped and set(skipped) == {str(tmp_path / "images" / "3.png")}
    assert all(3 not in batch.indices.tolist() for batch in batches)

    # resuming at step 1 (start = 1 * batch size), without workers: identical images, crops and masks
    resumed = next(iter(_loader(tmp_path / "images", num_workers=0, start=4)))
    for name in ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "indices", "positions"):
        assert torch.equal(getattr(resumed, name), getattr(batches[1], name)), name
