"""Curation across 2 gloo processes equals the single-process functions on the same data and seed."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dinolab.curation import distributed as D
from dinolab.curation.dedup import deduplicate
from dinolab.curation.index import IndexConfig
from dinolab.curation.kmeans import KMeansConfig, balanced_sample, hierarchical_kmeans, kmeans

sys.path.insert(0, str(Path(__file__).parent))
from curation_synthetic import blobs, planted_duplicates

KM = KMeansConfig(niter=10, seed=3)
IVF = IndexConfig(kind="ivf", nlist=16, nprobe=16)


def pool() -> np.ndarray:
    x, _ = blobs([300, 120, 60, 200, 90, 30], dim=24, spread=0.5, seed=1)
    return x[np.random.default_rng(2).permutation(len(x))]


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = pool()
        local, offset = D.rows_of(x)
        km = D.kmeans(local, 12, offset, len(x), KM)
        km_random = D.kmeans(local, 12, offset, len(x), KMeansConfig(niter=10, seed=3, init="random"))
        tree = D.hierarchical_kmeans(local, offset, len(x), [12, 4, 2], KM, [0, 1, 1])
        picked = D.balanced_sample(tree, offset, 200, "nearest", seed=5)
        dup_x, _ = planted_duplicates(700, 40, 30, dim=32, seed=4)
        dup_local, dup_offset = D.rows_of(dup_x)
        flat = D.deduplicate(dup_local, dup_offset, len(dup_x), 0.95, 8, IndexConfig(kind="flat"), batch_size=97)
        ivf = D.deduplicate(dup_local, dup_offset, len(dup_x), 0.95, 8, IVF, batch_size=97)
        mine = {
            "centroids": km.centroids,
            "assignment": km.assignment,
            "random_init": (km_random.centroids, km_random.assignment),
            "tree_leaves": tree.levels[0].assignment,
            "tree_upper": [level.assignment for level in tree.levels[1:]],
            "picked": picked,
            "dedup": [(r.keep, r.twin, r.similarity) for r in (flat, ivf)],
        }
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            queue.put(gathered)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    gathered = queue.get(timeout=180)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return gathered


pytestmark = pytest.mark.distributed


def test_kmeans_two_processes_equal_one(two_ranks):
    x = pool()
    reference = kmeans(x, 12, KM)  # the single-process (Faiss) path
    for rank in two_ranks:
        np.testing.assert_allclose(rank["centroids"], reference.centroids, rtol=0, atol=1e-5)
    assignment = np.concatenate([rank["assignment"] for rank in two_ranks])
    np.testing.assert_array_equal(assignment, reference.assignment)


def test_kmeans_with_faiss_random_init_two_processes_equal_one(two_ranks):
    x = pool()
    reference = kmeans(x, 12, KMeansConfig(niter=10, seed=3, init="random"))
    np.testing.assert_allclose(two_ranks[1]["random_init"][0], reference.centroids, rtol=0, atol=1e-5)
    assignment = np.concatenate([rank["random_init"][1] for rank in two_ranks])
    np.testing.assert_array_equal(assignment, reference.assignment)


def test_tree_and_balanced_sampling_two_processes_equal_one(two_ranks):
    x = pool()
    tree = hierarchical_kmeans(x, [12, 4, 2], KM, [0, 1, 1])
    np.testing.assert_array_equal(np.concatenate([r["tree_leaves"] for r in two_ranks]), tree.levels[0].assignment)
    for level, upper in enumerate(tree.levels[1:]):
        np.testing.assert_array_equal(two_ranks[0]["tree_upper"][level], upper.assignment)
    expected = balanced_sample(tree, 200, "nearest", seed=5)
    picked = np.concatenate([r["picked"] for r in two_ranks])
    assert len(picked) == 200
    np.testing.assert_array_equal(picked, expected)


@pytest.mark.parametrize("which", [0, 1], ids=["flat", "ivf"])
def test_dedup_two_processes_find_exactly_the_single_process_pairs(two_ranks, which):
    x, original = planted_duplicates(700, 40, 30, dim=32, seed=4)
    config = IndexConfig(kind="flat") if which == 0 else IVF
    reference = deduplicate(x, 0.95, 8, config, batch_size=97)
    keep = np.concatenate([r["dedup"][which][0] for r in two_ranks])
    twin = np.concatenate([r["dedup"][which][1] for r in two_ranks])
    similarity = np.concatenate([r["dedup"][which][2] for r in two_ranks])
    np.testing.assert_array_equal(keep, reference.keep)
    np.testing.assert_array_equal(twin, reference.twin)
    np.testing.assert_allclose(similarity, reference.similarity, atol=1e-6)
    assert (~keep).sum() >= 35  # the planted copies (a few may copy the same original) are found
    assert set(np.nonzero(~keep)[0]) <= set(np.nonzero(original >= 0)[0])


def test_row_blocks_cover_the_pool_once():
    blocks = [D.row_block(10, r, 3) for r in range(3)]
    assert blocks == [(0, 4), (4, 7), (7, 10)]


def _pipeline_rank(rank: int, world: int, port: int, store: str, out: str) -> None:
    from dinolab.curation.pipeline import DedupStage, PipelineConfig, SelectStage, StoreSpec, run_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    select = SelectStage(mode="balance", clusters=(12, 4), target=150, niter=8, seed=2)
    config = PipelineConfig(pool=StoreSpec(store=Path(store)), output=Path(out), dedup=DedupStage(k=8), select=select)
    run_pipeline(config)
    dist.destroy_process_group()


def test_pipeline_under_torchrun_writes_what_one_process_writes(tmp_path):
    from dinolab.curation import write_store
    from dinolab.curation.pipeline import DedupStage, PipelineConfig, SelectStage, StoreSpec, run_pipeline

    x, _ = planted_duplicates(500, 30, 20, dim=24, seed=7)
    store = write_store(tmp_path / "pool", x, [f"/p/{i:04d}.jpg" for i in range(len(x))], shard_size=128).root
    select = SelectStage(mode="balance", clusters=(12, 4), target=150, niter=8, seed=2)
    one = run_pipeline(
        PipelineConfig(pool=StoreSpec(store=store), output=tmp_path / "one", dedup=DedupStage(k=8), select=select)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_pipeline_rank, args=(r, 2, port, str(store), str(tmp_path / "two"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    assert one["duplicates"] >= 25 and one["selected"] == 150
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    for name in ("selected.txt", "manifest.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
