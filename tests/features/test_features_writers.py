"""Embedding files: every format reads back to the same arrays, row-aligned with paths.txt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from dinolab.features import EmbeddingResult, read_parquet_features, write_embeddings
from dinolab.features.writers import check_formats


@pytest.fixture
def result() -> EmbeddingResult:
    rng = np.random.default_rng(0)
    return EmbeddingResult(
        paths=[Path("x/a.png"), Path("y/b b.jpg"), Path("c.png")],
        features={
            "cls": rng.standard_normal((3, 8)).astype(np.float32),
            "patch_tokens": rng.standard_normal((3, 6, 8)).astype(np.float32),
        },
        failed=[(Path("bad.jpg"), "OSError: image file is truncated\n(12 bytes not processed)")],
        input_size=(28, 42),
        patch_grid=(2, 3),
        seconds=0.5,
    )


def test_all_formats_read_back(tmp_path: Path, result: EmbeddingResult) -> None:
    files = write_embeddings(result, tmp_path, ["npy", "parquet", "safetensors"], summary={"model": "m"})
    assert (tmp_path / "paths.txt").read_text().splitlines() == ["x/a.png", "y/b b.jpg", "c.png"]
    assert (
        tmp_path / "failed.txt"
    ).read_text() == "bad.jpg\tOSError: image file is truncated (12 bytes not processed)\n"
    for name, array in result.features.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), array)
    tensors = load_file(str(tmp_path / "embeddings.safetensors"))
    for name, array in result.features.items():
        np.testing.assert_array_equal(tensors[name], array)
    paths, features = read_parquet_features(tmp_path / "embeddings.parquet")
    assert paths == ["x/a.png", "y/b b.jpg", "c.png"]
    for name, array in result.features.items():
        np.testing.assert_array_equal(features[name], array)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "m" and summary["files"]["npy"] == ["cls.npy", "patch_tokens.npy"]
    assert files["parquet"] == ["embeddings.parquet"]


def test_parquet_columns_are_fixed_size_lists(tmp_path: Path, result: EmbeddingResult) -> None:
    write_embeddings(result, tmp_path, ["parquet"])
    table = pq.read_table(tmp_path / "embeddings.parquet")
    assert table.schema.field("cls").type == pa.list_(pa.float32(), 8)
    assert table.schema.field("patch_tokens").type == pa.list_(pa.list_(pa.float32(), 8), 6)
    # row i, read the plain pyarrow way, is image i's feature
    assert table.column("cls")[1].as_py() == pytest.approx(result.features["cls"][1].tolist())
    assert not (tmp_path / "cls.npy").exists()


def test_format_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        check_formats(["npy", "hdf5"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(ImportError, match=r"pip install 'dinolab\[parquet\]'"):
        check_formats(["parquet"])
    assert check_formats(["npy", "safetensors", "npy"]) == ["npy", "safetensors"]
