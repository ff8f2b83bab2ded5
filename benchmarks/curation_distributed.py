"""Curation of a generated pool (embeddings given) in one process vs several, per stage time and peak memory.

    .venv/bin/python benchmarks/curation_distributed.py --pool-size 200000                 # one process
    .venv/bin/torchrun --nproc_per_node 2 benchmarks/curation_distributed.py --pool-size 200000

The pool (``--pool-size`` x ``--dim`` unit vectors around 10,000 concepts, 2 % planted near-duplicates; the generator of
benchmarks/curation.py) is written once to an fp16 store in ``--store`` and memory-mapped; every rank loads its
contiguous block of rows. Stages, all from :mod:`dinolab.curation.distributed` (the same results as one process):
deduplication (IVF, nprobe 8, k 8, threshold 0.95), hierarchical k-means (``--clusters``, 10 iterations) and balanced
sampling of a tenth of the pool. Faiss gets ``cores / world_size`` threads per rank. Prints one JSON line (rank 0):
per stage the slowest rank's seconds, and every rank's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from curation import generated_pool

from dinolab.curation import EmbeddingStore, IndexConfig, KMeansConfig, write_store
from dinolab.curation import distributed as D


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", default="1000,100,10")
    parser.add_argument("--store", default="/tmp/dinolab_bench_pool")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, world = D.world()
    baseline = peak_rss_gib()  # Python + torch + Faiss before any data
    faiss.omp_set_num_threads(max(1, args.cores // world))
    root = Path(args.store) / f"{args.pool_size}x{args.dim}"
    if rank == 0 and not (root / "store.json").is_file():
        x, _ = generated_pool(args.pool_size, args.dim)
        write_store(root, x, [f"img_{i:08d}.jpg" for i in range(args.pool_size)], shard_size=131_072)
        del x
    if world > 1:
        dist.barrier()
    pool = EmbeddingStore.open(root).vectors()
    start, stop = D.row_block(len(pool), rank, world)
    timings: dict[str, float] = {}
    memory: dict[str, float] = {}

    def stage(name: str, fn):
        if world > 1:
            dist.barrier()
        tick = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - tick
        memory[name] = peak_rss_gib()
        return out

    local = stage("load_block", lambda: np.ascontiguousarray(pool[start:stop], dtype=np.float32))
    index = IndexConfig(kind="ivf", nprobe=8)
    dedup = stage("dedup", lambda: D.deduplicate(local, start, len(pool), 0.95, 8, index))
    alive = np.nonzero(dedup.keep)[0]
    kept = local[alive]  # the survivors; their global numbering is only needed for the output
    local = None  # k-means needs only the survivors: one copy of the block in memory, not two
    counts = [int(c) for c in (D._all_gather_objects(len(kept)))]
    offset = sum(counts[:rank])
    clusters = [int(c) for c in args.clusters.split(",")]
    tree = stage(
        "hierarchical_kmeans",
        lambda: D.hierarchical_kmeans(kept, offset, sum(counts), clusters, KMeansConfig(niter=10, seed=0)),
    )
    picked = stage("balanced_sample", lambda: D.balanced_sample(tree, offset, args.pool_size // 10))
    report = {
        "rank": rank,
        "seconds": timings,
        "peak_rss_gib": memory,
        "baseline_gib": baseline,
        "removed": int((~dedup.keep).sum()),
        "selected": len(picked),
    }
    everyone = D._all_gather_objects(report)
    if rank == 0:
        summary = {
            "pool": [args.pool_size, args.dim],
            "processes": world,
            "threads_per_process": max(1, args.cores // world),
            "stage_seconds_slowest_rank": {
                k: round(max(r["seconds"][k] for r in everyone), 1) for k in everyone[0]["seconds"]
            },
            "peak_rss_gib_per_rank": [round(max(r["peak_rss_gib"].values()), 2) for r in everyone],
            "rss_after_imports_gib_per_rank": [round(r["baseline_gib"], 2) for r in everyone],
            "peak_rss_gib_after_stage_rank0": {k: round(v, 2) for k, v in everyone[0]["peak_rss_gib"].items()},
            "duplicates_removed": sum(r["removed"] for r in everyone),
            "selected": sum(r["selected"] for r in everyone),
        }
        print(json.dumps(summary))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
