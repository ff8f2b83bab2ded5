"""Sharded stores and the resumable embedding job (crash + resume, ranks, TorchScript models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dinolab.curation import EmbedConfig, EmbeddingStore, IncompleteStoreError, ShardedArray, TransformConfig
from dinolab.curation.embed import embed_to_store, is_torchscript_file, load_embedding_model
from dinolab.models.vit import vit_tiny

TRANSFORM = TransformConfig(resize=28, crop=28)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """13 small random images and one corrupt file (14 inputs: shards of 4 -> 4 shards)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(13):
        Image.fromarray(rng.integers(0, 255, (24 + i, 30, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    (folder / "img_05_broken.jpg").write_bytes(b"not a jpeg at all")
    return folder


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return vit_tiny(img_size=28, depth=2, init_values=1.0).eval()  # LayerScale 1: features depend on the image


def config(folder: Path, store: Path, **overrides) -> EmbedConfig:
    kwargs = dict(
        model="vit_tiny", inputs=(str(folder),), store=store, transform=TRANSFORM, shard_size=4, batch_size=3,
        num_workers=0, storage_dtype="fp32", progress=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return EmbedConfig(**kwargs)


def test_sharded_array_reads_like_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 5)).astype(np.float16) for n in (3, 0, 7, 1, 4)]
    full = np.concatenate(parts).astype(np.float32)
    x = ShardedArray(parts)
    assert x.shape == full.shape
    for key in (slice(0, 15), slice(2, 11), slice(10, 15), slice(4, 4), slice(0, 15, 2)):
        np.testing.assert_array_equal(x[key], full[key])
    index = rng.integers(0, 15, 40)
    np.testing.assert_array_equal(x[index], full[index])
    np.testing.assert_array_equal(x[-1], full[-1])


def test_interrupted_embedding_resumes_without_redoing_finished_shards(image_folder: Path, tmp_path: Path) -> None:
    model = tiny_model()
    reference = embed_to_store(config(image_folder, tmp_path / "uninterrupted"), model=model).store

    class Crash(RuntimeError):
        pass

    def crash_after_shard_1(shard: int) -> None:
        if shard == 1:
            raise Crash

    store_dir = tmp_path / "resumed"
    with pytest.raises(Crash):
        embed_to_store(config(image_folder, store_dir), model=model, after_shard=crash_after_shard_1)
    partial = EmbeddingStore.open(store_dir, require_complete=False)
    assert partial.done_shards() == [0, 1] and partial.missing_shards() == [2, 3]
    with pytest.raises(IncompleteStoreError, match="rerun"):
        EmbeddingStore.open(store_dir)
    done_files = [partial.shard_file(s, suffix) for s in (0, 1) for suffix in (".npy", ".txt", ".json")]
    mtimes = {f: os.stat(f).st_mtime_ns for f in done_files}

    result = embed_to_store(config(image_folder, store_dir), model=model)
    assert result.embedded_shards == [2, 3] and result.skipped_shards == [0, 1]
    assert {f: os.stat(f).st_mtime_ns for f in done_files} == mtimes  # shards 0..1 untouched
    store = EmbeddingStore.open(store_dir)
    np.testing.assert_array_equal(store.vectors()[:], reference.vectors()[:])
    assert store.paths() == reference.paths()
    assert len(store) == 13 and [f["path"] for f in store.failures()] == [str(image_folder / "img_05_broken.jpg")]
    # rows are L2-normalised model outputs, in input order
    norms = np.linalg.norm(store.vectors()[:], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    with torch.no_grad():
        first = model(TRANSFORM.build()(Image.open(store.paths()[0]).convert("RGB"))[None])
    np.testing.assert_allclose(store.vectors()[0], torch.nn.functional.normalize(first, dim=1)[0].numpy(), atol=1e-5)


def test_a_shard_without_its_record_is_redone(image_folder: Path, tmp_path: Path) -> None:
    model = tiny_model()
    store = embed_to_store(config(image_folder, tmp_path / "s", storage_dtype="fp16"), model=model).store
    before = store.vectors()[:]
    store.shard_file(2, ".json").unlink()  # as if the job died between writing the array and the record
    result = embed_to_store(config(image_folder, tmp_path / "s", storage_dtype="fp16"), model=model)
    assert result.embedded_shards == [2]
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "s").vectors()[:], before)
    assert store.vectors().parts[0].dtype == np.float16


def test_ranks_embed_disjoint_shards_and_together_equal_one_process(image_folder: Path, tmp_path: Path) -> None:
    model = tiny_model()
    single = embed_to_store(config(image_folder, tmp_path / "single"), model=model).store
    r0 = embed_to_store(config(image_folder, tmp_path / "ranks", rank=0, world_size=2), model=model)
    assert r0.embedded_shards == [0, 2]
    assert EmbeddingStore.open(tmp_path / "ranks", require_complete=False).missing_shards() == [1, 3]
    r1 = embed_to_store(config(image_folder, tmp_path / "ranks", rank=1, world_size=2), model=model)
    assert r1.embedded_shards == [1, 3]
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "ranks").vectors()[:], single.vectors()[:])


def test_a_store_refuses_a_different_job(image_folder: Path, tmp_path: Path) -> None:
    embed_to_store(config(image_folder, tmp_path / "s", model="pixels:4"))
    with pytest.raises(ValueError, match="different embedding job"):
        embed_to_store(config(image_folder, tmp_path / "s", model="pixels:5"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # SSCD and friends ship as TorchScript
def test_torchscript_models_are_loaded_with_jit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=7), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    traced = torch.jit.trace(net, torch.randn(1, 3, 28, 28))
    traced.save(str(tmp_path / "descriptor.pt"))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    assert is_torchscript_file(tmp_path / "descriptor.pt") and not is_torchscript_file(tmp_path / "weights.pt")
    loaded = load_embedding_model(str(tmp_path / "descriptor.pt"))
    assert isinstance(loaded, torch.jit.ScriptModule)
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(loaded(images), net(images))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_fill_the_store(image_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
        "-m", "dinolab", "curate", "embed", "--model", "pixels:4", "--inputs", str(image_folder),
        "--store", str(store), "--resize", "28", "--crop", "28", "--shard-size", "4", "--num-workers", "0",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = EmbeddingStore.open(store)
    single = embed_to_store(config(image_folder, tmp_path / "single", model="pixels:4", storage_dtype="fp16")).store
    np.testing.assert_array_equal(done.vectors()[:], single.vectors()[:])
