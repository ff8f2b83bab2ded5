"""Labelled data: image folders, file lists, embeddings, torchvision (offline), class alignment, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.eval.readers.classification import (
    LabelledImages,
    load_embeddings,
    load_labelled,
    load_torchvision,
    stratified_split,
)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


def test_image_folder_classes_and_labels(tmp_path: Path) -> None:
    for rel in ("b/1.png", "b/deep/2.jpg", "a/3.png", "c/4.png"):
        _image(tmp_path / rel)
    (tmp_path / "c" / "notes.txt").write_text("not an image")
    data = load_labelled(tmp_path)
    assert isinstance(data, LabelledImages) and data.classes == ["a", "b", "c"]
    assert {(p.relative_to(tmp_path).as_posix(), int(label)) for p, label in zip(data.paths, data.labels)} == {
        ("a/3.png", 0),
        ("b/1.png", 1),
        ("b/deep/2.jpg", 1),
        ("c/4.png", 2),
    }


def test_file_lists_txt_and_csv(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "x y.png")
    _image(tmp_path / "img" / "z.png")
    (tmp_path / "list.txt").write_text("# comment\nimg/x y.png\t10\n\nimg/z.png 9\n")
    data = load_labelled(tmp_path / "list.txt")
    assert data.classes == ["9", "10"]  # integer labels sort numerically
    assert [p.name for p in data.paths] == ["x y.png", "z.png"] and data.labels.tolist() == [1, 0]
    (tmp_path / "list.csv").write_text(f"path,label\n{tmp_path}/img/z.png,dog\nimg/x y.png,cat\n")
    data = load_labelled(tmp_path / "list.csv")
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [1, 0]
    (tmp_path / "bad.txt").write_text("only-a-path\n")
    with pytest.raises(ValueError, match="path<separator>label"):
        load_labelled(tmp_path / "bad.txt")


def test_align_classes_by_name(tmp_path: Path) -> None:
    for rel in ("train/cat/1.png", "train/dog/2.png", "train/emu/3.png", "val/dog/4.png", "val/emu/5.png"):
        _image(tmp_path / rel)
    train, val = load_labelled(tmp_path / "train"), load_labelled(tmp_path / "val")
    assert val.labels.tolist() == [0, 1]
    aligned = val.with_classes(train.classes)
    assert aligned.labels.tolist() == [1, 2] and aligned.identity != val.identity
    _image(tmp_path / "val" / "fox" / "6.png")
    with pytest.raises(ValueError, match="fox"):
        load_labelled(tmp_path / "val").with_classes(train.classes)


def test_embeddings_npz_folder_and_paths_index(tmp_path: Path) -> None:
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "e.npz", features=features, labels=np.array([1, 0, 1, 2]))
    data = load_labelled(tmp_path / "e.npz")
    np.testing.assert_array_equal(data.features, features)
    assert data.labels.tolist() == [1, 0, 1, 2] and data.classes == ["0", "1", "2"]

    folder = tmp_path / "embed"
    folder.mkdir()
    # the layout `dinolab embed --patch-pooled --patch-tokens` writes
    np.save(folder / "cls.npy", features)
    np.save(folder / "patch_pooled.npy", -features)
    np.save(folder / "patch_tokens.npy", np.zeros((4, 2, 3), dtype=np.float32))
    (folder / "paths.txt").write_text("/d/cat/1.png\n/d/dog/2.png\n/d/cat/3.png\n/d/ant/4.png\n")
    data = load_labelled(folder)
    assert data.classes == ["ant", "cat", "dog"] and data.labels.tolist() == [1, 2, 1, 0]
    np.testing.assert_array_equal(data.features, features)
    np.testing.assert_array_equal(data.patch_mean, -features)
    (folder / "labels.txt").write_text("x\ny\nx\ny\n")  # an explicit labels file wins over the paths index
    assert load_embeddings(folder).labels.tolist() == [0, 1, 0, 1]
    np.save(folder / "labels.npy", np.array([1, 2]))
    with pytest.raises(ValueError, match="4 embeddings but 2 labels"):
        load_embeddings(folder)


def test_torchvision_offline_error_is_clear(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--download"):
        load_labelled("torchvision:cifar10", data_root=tmp_path)
    with pytest.raises(ValueError, match="unknown torchvision dataset"):
        load_torchvision("imagenet-xxl", root=tmp_path)


def test_unknown_spec_names_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="torchvision:NAME"):
        load_labelled(tmp_path / "missing")


def test_stratified_split_is_deterministic_and_per_class() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 5, 1])
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(kept, held).size == 0 and np.union1d(kept, held).tolist() == list(range(36))
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 4, 1, 0]  # a 1-item class stays in train
    again_kept, again_held = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=1)[1])
