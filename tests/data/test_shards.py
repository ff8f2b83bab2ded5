"""Sharded datasets: tar shards (webdataset / wids) and Hugging Face datasets give the folder's batches; streams
split across ranks and workers without overlap and resume exactly mid-shard."""

import json
import os
import socket
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dinolab.config import apply_overrides
from dinolab.data.shard_writer import verify_shards, write_shards
from dinolab.data.shards import ShardStream, StreamCursor, open_images
from dinolab.train.data import build_training_data
from dinolab.train.distributed import DistEnv
from dinolab.train.recipes import get_recipe

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Thirteen small images of several formats and modes, and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(13):
        pixels = (rng.random((30 + i, 36, 3)) * 255).astype("uint8")
        image = Image.fromarray(pixels)
        if i % 3 == 1:
            image.convert("L").save(root / f"img{i:02d}.png")
        elif i % 3 == 2:
            image.save(root / f"img{i:02d}.jpg", quality=90)
        else:
            image.save(root / f"img{i:02d}.png")
    (root / "img05b_corrupt.jpg").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(folder, out, shard_size=5)
    return out


@pytest.fixture(scope="module")
def hf_disk(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "dataset"
    paths = [str(p) for p in open_images(folder).names()]
    table = {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths]}
    dataset = datasets.Dataset.from_dict(table, features=datasets.Features({"image": datasets.Image()}))
    dataset.save_to_disk(str(out))
    return out


def config(data, out: Path, *overrides: str):
    return apply_overrides(get_recipe("test_tiny"), [f"run.data={data}", f"run.output_dir={out}", *overrides])


def take(data, count: int) -> list:
    return [batch for _ in range(count) for batch in data.next_batches(1, torch.device("cpu"))]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.global_crops, y.global_crops, rtol=0, atol=0)
        torch.testing.assert_close(x.local_crops, y.local_crops, rtol=0, atol=0)
        torch.testing.assert_close(x.masks, y.masks, rtol=0, atol=0)
        assert len(x.skipped) == len(y.skipped)


def test_converter_writes_shards_with_counts_and_checksums(folder, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_inputs"] == 14
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 4]
    assert verify_shards(shards) == []
    with tarfile.open(shards / "000000.tar") as tar:
        names = tar.getnames()
        first = tar.extractfile("000000000.png").read()
    assert names[:2] == ["000000000.path.txt", "000000000.png"]
    assert first == sorted(folder.iterdir())[0].read_bytes()  # the file's bytes, not re-encoded


def test_converter_resumes_after_an_interruption(folder, shards, tmp_path):
    def crash(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, tmp_path, shard_size=5, after_shard=crash)
    assert not json.loads((tmp_path / "manifest.json").read_text())["complete"]
    result = write_shards(folder, tmp_path, shard_size=5)
    assert result.written == [2]
    for name in ("000000.tar", "000001.tar", "000002.tar"):
        assert (tmp_path / name).read_bytes() == (shards / name).read_bytes()
    (tmp_path / "000001.tar").write_bytes(b"damaged")
    assert verify_shards(tmp_path) == ["000001.tar"]


def test_shard_sources_read_the_folders_images(folder, shards, hf_disk):
    files, tars, hf = open_images(folder), open_images(shards), open_images(f"hf-disk:{hf_disk}")
    assert len(files) == len(tars) == len(hf) == 14
    assert tars.name(7) == f"{shards / '000001.tar'}#2"
    pattern = open_images(str(shards / "{000000..000002}.tar"))
    for i in range(14):
        if "corrupt" in files.name(i):
            for source in (tars, hf, pattern):
                with pytest.raises(Exception, match="cannot identify"):
                    source.load(i)
            continue
        expected = np.asarray(files.load(i))
        for source in (tars, hf, pattern):
            np.testing.assert_array_equal(np.asarray(source.load(i)), expected)


@pytest.mark.parametrize("kind", ["tar", "hf-disk"])
def test_training_batches_equal_the_folders(folder, shards, hf_disk, tmp_path, kind):
    data = shards if kind == "tar" else f"hf-disk:{hf_disk}"
    from_folder = build_training_data(config(folder, tmp_path / "a"), ENV)
    from_shards = build_training_data(config(data, tmp_path / "b"), ENV)
    expected, got = take(from_folder, 5), take(from_shards, 5)
    assert_same_batches(expected, got)
    assert sum(len(b.skipped) for b in got) >= 1  # the corrupt sample was met, skipped and reported


def stream_batches(data, out: Path, steps: int, workers: int, start: int = 0, state: dict | None = None):
    cfg = config(data, out, "run.data_mode=stream", f"run.num_workers={workers}")
    training = build_training_data(cfg, ENV, start_sample=start * 4, stream_state=state)
    try:
        return take(training, steps), training.stream_state()
    finally:
        training.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly_mid_shard(shards, tmp_path, workers):
    expected, _ = stream_batches(shards, tmp_path, 7, workers)
    first, state = stream_batches(shards, tmp_path, 3, workers)  # 12 samples: the middle of a 5-sample shard
    assert any(offset % 5 for _, offset in state["next"].values())
    rest, _ = stream_batches(shards, tmp_path, 4, workers, start=3, state=state)
    assert_same_batches(expected, first + rest)


def test_stream_gives_every_shard_once_per_pass(shards):
    stream = ShardStream([str(shards)], transform=lambda image: 0, seed=3)
    assert sorted(stream.shard_of_slot(g) for g in range(3)) == [0, 1, 2]
    assert sorted(stream.shard_of_slot(g) for g in range(3, 6)) == [0, 1, 2]
    positions = [sample.position for _, sample in zip(range(13), stream)]
    assert len(set(positions)) == 13  # 14 samples in a pass, one corrupt: skipped


def test_cursor_resplit_restarts_at_the_first_unfinished_shard():
    cursor = StreamCursor(2, {0: (4, 3), 1: (3, 0)})
    assert cursor.resplit(3).next == {0: (3, 0), 1: (4, 0), 2: (5, 0)}


def _read_rank(rank: int, world: int, port: int, shards: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stream = ShardStream([shards], transform=lambda image: 0, seed=1, rank=rank, world_size=world, num_workers=2)
        names = []
        for worker in range(2):  # the two DataLoader workers' shares, read in this process
            stream.batch_offset = worker
            iterator = iter(stream)
            # one pass over 4 shards: each of the 4 consumers (2 ranks x 2 workers) gets one shard
            slot = stream.cursor.start_of(stream.consumer())[0]
            size = stream.shards[stream.shard_of_slot(slot)]
            names += [f"{size.location}#{next(iterator).index}" for _ in range(3)]
        gathered = [None] * world
        dist.all_gather_object(gathered, names)
        if rank == 0:
            queue.put(gathered)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_read_disjoint_samples_covering_the_set(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(folder / f"{i:02d}.png")
    write_shards(folder, tmp_path / "shards", shard_size=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_rank, args=(r, 2, port, str(tmp_path / "shards"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    gathered = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rank0, rank1 = set(gathered[0]), set(gathered[1])
    assert len(rank0) == len(rank1) == 6 and not rank0 & rank1
    expected = {f"{tmp_path / 'shards' / f'{s:06d}.tar'}#{k}" for s in range(4) for k in range(3)}
    assert rank0 | rank1 == expected


def test_embedding_from_shards_equals_embedding_the_folder(folder, shards, hf_disk, tmp_path):
    from dinolab.curation import EmbedConfig, TransformConfig
    from dinolab.curation import embed_to_store as curate_embed
    from dinolab.features.embed import Resolution
    from dinolab.features.embed import embed_images as features_embed
    from dinolab.models.vit import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(img_size=28, depth=2, init_values=1.0).eval()
    stores = {}
    for name, source in (("folder", folder), ("tar", shards), ("hf", f"hf-disk:{hf_disk}")):
        config = EmbedConfig(
            model="vit_tiny", inputs=(str(source),), store=tmp_path / name, transform=TransformConfig(resize=28, crop=28),
            shard_size=4, batch_size=3, num_workers=0, storage_dtype="fp32", progress=False,
        )  # fmt: skip
        stores[name] = curate_embed(config, model=model).store
    for name in ("tar", "hf"):
        np.testing.assert_array_equal(stores[name].vectors()[:], stores["folder"].vectors()[:])
        assert len(stores[name].failures()) == 1
    assert stores["tar"].paths()[0] == f"{shards / '000000.tar'}#0"
    resolution = Resolution(resize=28, crop=28)
    direct = features_embed(model, [shards], resolution=resolution, num_workers=0, progress=False)
    reference = features_embed(model, [folder], resolution=resolution, num_workers=0, progress=False)
    np.testing.assert_array_equal(direct.features["cls"], reference.features["cls"])
    assert len(direct.failed) == len(reference.failed) == 1
