"""Curation throughput: embedding speed, and deduplicating / clustering a large generated pool.

    .venv/bin/python benchmarks/curation.py                       # 1M x 384 pool, vit_small embedding at 224
    .venv/bin/python benchmarks/curation.py --num 100000 --embed-images 32   # a quick run

Embedding: ``vit_small`` (random init, fp32) at 224 px on generated 256 px JPEGs, through the resumable
store writer (model loading excluded). Pool: ``--num`` unit vectors around 10,000 concept centres with 2 %
planted near-duplicates (cosine ~0.99), written to an fp16 sharded store and read back memory-mapped; then
deduplication (IVF index, exact re-scoring, connected components) and hierarchical k-means
(``--clusters``, default 1000,100,10) with balanced sampling of a tenth of the pool.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.curation import (
    EmbedConfig,
    EmbeddingStore,
    IndexConfig,
    KMeansConfig,
    TransformConfig,
    balanced_sample,
    deduplicate,
    embed_to_store,
    hierarchical_kmeans,
    write_store,
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_embedding(root: Path, num_images: int, batch_size: int, num_workers: int) -> dict:
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(num_images):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")
    config = EmbedConfig(
        model="vit_small",
        inputs=(str(folder),),
        store=root / "embed_store",
        transform=TransformConfig(resize=256, crop=224),
        shard_size=batch_size * 2,
        batch_size=batch_size,
        num_workers=num_workers,
        dtype="fp32",
        device="cpu",
        progress=False,
    )
    result = embed_to_store(config)
    return {
        "images": result.images,
        "seconds": round(result.seconds, 2),
        "images_per_s": round(result.images_per_second, 2),
    }


def generated_pool(num: int, dim: int, seed: int = 0, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Rows around 10,000 concept centres; the last 2 % are near-duplicates of earlier rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10_000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    num_copies = num // 50
    x = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num - num_copies, chunk):
        stop = min(start + chunk, num - num_copies)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        x[start:stop] = centres[rng.integers(0, len(centres), stop - start)] + 0.8 * noise
    x[: num - num_copies] /= np.linalg.norm(x[: num - num_copies], axis=1, keepdims=True)
    original = rng.integers(0, num - num_copies, num_copies)
    noise = rng.standard_normal((num_copies, dim), dtype=np.float32) / np.sqrt(dim)
    x[num - num_copies :] = x[original] + 0.12 * noise
    x[num - num_copies :] /= np.linalg.norm(x[num - num_copies :], axis=1, keepdims=True)
    return x, original


def bench_pool(root: Path, num: int, dim: int, clusters: list[int], nprobe: int, k: int) -> dict:
    tick = time.perf_counter()
    x, original = generated_pool(num, dim)
    store = write_store(root / "pool", x, [f"img_{i:08d}.jpg" for i in range(num)], shard_size=131_072)
    del x
    prepare_s = time.perf_counter() - tick
    pool = EmbeddingStore.open(store.root).vectors()  # memory-mapped fp16 shards

    tick = time.perf_counter()
    result = deduplicate(pool, threshold=0.95, k=k, config=IndexConfig(kind="ivf", nprobe=nprobe))
    dedup_s = time.perf_counter() - tick
    num_copies = len(original)
    removed = ~result.keep
    recall = removed[num - num_copies :].mean()
    precision = removed[num - num_copies :].sum() / max(removed.sum(), 1)

    tick = time.perf_counter()
    tree = hierarchical_kmeans(pool, clusters, KMeansConfig(niter=10, seed=0))
    cluster_s = time.perf_counter() - tick
    tick = time.perf_counter()
    chosen = balanced_sample(tree, num // 10)
    sample_s = time.perf_counter() - tick
    return {
        "pool": [num, dim],
        "prepare_store_s": round(prepare_s, 1),
        "dedup": {
            "seconds": round(dedup_s, 1),
            "index": "ivf",
            "nprobe": nprobe,
            "k": k,
            "removed": int(removed.sum()),
        },
        "dedup_recall_of_planted": round(float(recall), 4),
        "dedup_precision": round(float(precision), 4),
        "hierarchical_kmeans": {"seconds": round(cluster_s, 1), "clusters": clusters, "niter": 10},
        "balanced_sample": {"seconds": round(sample_s, 2), "selected": len(chosen)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1_000_000, help="pool size for dedup / clustering")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", default="1000,100,10")
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="neighbours per image in deduplication")
    parser.add_argument("--embed-images", type=int, default=64, help="0 skips the embedding benchmark")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.embed_images:
            results["embedding_vit_small_224_fp32"] = bench_embedding(
                root, args.embed_images, args.batch_size, args.num_workers
            )
            print(json.dumps(results, indent=2), flush=True)
        clusters = [int(c) for c in args.clusters.split(",")]
        results["pool"] = bench_pool(root, args.num, args.dim, clusters, args.nprobe, args.k)
    results["peak_rss_gib"] = round(peak_rss_gib(), 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
