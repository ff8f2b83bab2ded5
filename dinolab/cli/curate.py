"""``dinolab curate ACTION``: embed image collections, deduplicate, decontaminate, retrieve, balance, run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dinolab.cli.options import (
    MODEL_HELP,
    add_backbone_arguments,
    add_runtime_arguments,
    backbone_from_args,
    model_description,
)
from dinolab.curation.embed import EmbedConfig, TransformConfig, embed_to_store
from dinolab.curation.index import INDEX_KINDS, IndexConfig
from dinolab.curation.pipeline import (
    DecontaminateStage,
    DedupStage,
    PipelineConfig,
    SelectStage,
    StoreSpec,
    load_pipeline_config,
    run_pipeline,
)
from dinolab.curation.store import EmbeddingStore
from dinolab.runtime import join_process_group


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1000,100,10, got {text!r}") from error
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"cluster counts must be >= 1, got {text!r}")
    return values


def _add_index_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Faiss index")
    group.add_argument("--index", default="auto", choices=INDEX_KINDS, help="index kind (auto: by pool size)")
    group.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~2*sqrt(N))")
    group.add_argument("--nprobe", type=int, default=8, help="IVF lists visited per query")
    group.add_argument("--pq-m", type=int, default=None, help="IVFPQ bytes per vector (divides the dim)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, required=True, help="output folder (selected.txt, manifest, summary)")
    parser.add_argument("--manifest-format", default="csv", choices=("csv", "parquet"))


def _index_config(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(kind=args.index, nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    embed = actions.add_parser("embed", help="embed images into a sharded store (resumable; torchrun-parallel)")
    add_backbone_arguments(embed, model_help=MODEL_HELP + ", a TorchScript file, or pixels[:S] (grey thumbnails)")
    add_runtime_arguments(embed, num_workers=2)
    embed.add_argument("--inputs", nargs="+", required=True, help="image folders, files or .txt path lists")
    embed.add_argument("--store", type=Path, required=True, help="store folder")
    embed.add_argument("--resize", type=int, default=256, help="short side (with --crop) or square side (--crop 0)")
    embed.add_argument("--crop", type=int, default=224, help="centre crop; 0 = resize the whole image, no crop")
    embed.add_argument("--shard-size", type=int, default=4096)
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--storage-dtype", default="fp16", choices=("fp16", "fp32"), help="precision on disk")
    embed.add_argument("--rank", type=int, default=None, help="this process' rank (default: $RANK or 0)")
    embed.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    embed.set_defaults(_run=_run_embed)

    dedup = actions.add_parser("dedup", help="remove near-duplicates (one image per connected component)")
    dedup.add_argument("--store", type=Path, required=True)
    dedup.add_argument("--threshold", type=float, default=0.95, help="cosine similarity joining two images")
    dedup.add_argument("--k", type=int, default=16, help="neighbours examined per image")
    _add_output_options(dedup)
    _add_index_options(dedup)
    dedup.set_defaults(_run=_run_stages)

    decon = actions.add_parser("decontaminate", help="drop pool images that are near-duplicates of evaluation images")
    decon.add_argument("--store", type=Path, required=True)
    decon.add_argument("--eval-store", type=Path, nargs="+", required=True, help="stores of the evaluation sets")
    decon.add_argument("--threshold", type=float, default=0.95)
    _add_output_options(decon)
    _add_index_options(decon)
    decon.set_defaults(_run=_run_stages)

    retrieve = actions.add_parser("retrieve", help="retrieve pool images close to curated seed sets")
    retrieve.add_argument("--pool", type=Path, required=True, help="pool store")
    retrieve.add_argument("--seeds", type=Path, nargs="+", required=True, help="seed stores")
    retrieve.add_argument("--mode", choices=("sample", "cluster"), default="sample")
    retrieve.add_argument("--n", type=int, default=4, help="sample mode: nearest pool images per seed")
    retrieve.add_argument("--m", type=int, default=100, help="cluster mode: images from each seed's cluster")
    retrieve.add_argument("--clusters", type=int, default=1000, help="cluster mode: k-means clusters of the pool")
    retrieve.add_argument("--pick", choices=("nearest", "random"), default="nearest")
    retrieve.add_argument("--niter", type=int, default=20)
    retrieve.add_argument("--seed", type=int, default=0)
    _add_output_options(retrieve)
    _add_index_options(retrieve)
    retrieve.set_defaults(_run=_run_stages)

    balance = actions.add_parser("balance", help="seedless balanced curation by hierarchical k-means")
    balance.add_argument("--store", type=Path, required=True)
    balance.add_argument(
        "--clusters", type=_int_list, default=(1000, 100, 10), help="clusters per level, e.g. 1000,100,10"
    )
    balance.add_argument("--levels", type=int, default=None, help="number of levels (checks --clusters)")
    balance.add_argument("--target", type=int, required=True, help="number of images to keep")
    balance.add_argument("--pick", choices=("nearest", "random"), default="nearest")
    balance.add_argument("--resampling-steps", type=int, default=0, help="resampling refinements per level > 1")
    balance.add_argument("--niter", type=int, default=20)
    balance.add_argument("--seed", type=int, default=0)
    _add_output_options(balance)
    _add_index_options(balance)
    balance.set_defaults(_run=_run_stages)

    pipeline = actions.add_parser("run", help="the whole pipeline from a TOML/JSON config (embed -> ... -> outputs)")
    pipeline.add_argument("config", type=Path)
    pipeline.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. select.target=100000 dedup.threshold=0.9",
    )
    pipeline.add_argument("--output", type=Path, default=None, help="override the config's output folder")
    pipeline.set_defaults(_run=_run_config)


def run(args: argparse.Namespace) -> int:  # replaced by the chosen action's function via set_defaults
    raise AssertionError("unreachable: argparse dispatches to the action")


# ------------------------------------------------------------------------------------------------ actions
def _run_embed(args: argparse.Namespace) -> int:
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not args.model:
        raise ValueError("name the model with --model MODEL (a backbone, a TorchScript file or pixels[:S])")
    # the shared loader for what it reads (weights, keywords, run directories); curation's own for pixels[:S],
    # TorchScript files and plain names. The store records the whole description, so a resume checks it.
    shared = bool(args.weights or args.model_arg) or Path(args.model).is_dir()
    torch.manual_seed(args.seed)  # random-init backbones are reproducible
    model = backbone_from_args(args) if shared else None
    config = EmbedConfig(
        model=model_description(args),
        inputs=tuple(args.inputs),
        store=args.store,
        transform=TransformConfig(resize=args.resize, crop=args.crop),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        dtype=args.dtype,
        storage_dtype=args.storage_dtype,
        device=args.device,
        rank=rank,
        world_size=world,
        progress=rank == 0 and not args.no_progress,
    )
    distributed = join_process_group("gloo", min_world_size=2)  # launched by torchrun: wait for every rank
    result = embed_to_store(config, model=model)
    print(
        f"rank {rank}/{world}: embedded {result.images} images in {len(result.embedded_shards)} shards "
        f"({result.images_per_second:.1f} img/s), {result.failures} unreadable, "
        f"{len(result.skipped_shards)} shards already done"
    )
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        store = EmbeddingStore.open(args.store, require_complete=False)
        missing = store.missing_shards()
        state = "complete" if not missing else f"{len(missing)} shards still to embed (other ranks)"
        print(f"store {args.store}: {len(store)} embeddings, {len(store.failures())} unreadable, {state}")
    return 0


def _pipeline_from_args(args: argparse.Namespace) -> PipelineConfig:
    common = dict(
        output=args.output, manifest_format=args.manifest_format, index=_index_config(args), command=args.action
    )
    if args.action == "dedup":
        return PipelineConfig(
            pool=StoreSpec(store=args.store), dedup=DedupStage(threshold=args.threshold, k=args.k), **common
        )
    if args.action == "decontaminate":
        stage = DecontaminateStage(eval=tuple(StoreSpec(store=s) for s in args.eval_store), threshold=args.threshold)
        return PipelineConfig(pool=StoreSpec(store=args.store), decontaminate=stage, **common)
    if args.action == "retrieve":
        select = SelectStage(
            mode=args.mode,
            seeds=tuple(StoreSpec(store=s) for s in args.seeds),
            n=args.n,
            m=args.m,
            clusters=(args.clusters,),
            pick=args.pick,
            niter=args.niter,
            seed=args.seed,
        )
        return PipelineConfig(pool=StoreSpec(store=args.pool), select=select, **common)
    if args.levels is not None and args.levels != len(args.clusters):
        raise SystemExit(f"--levels {args.levels} does not match --clusters {','.join(map(str, args.clusters))}")
    select = SelectStage(
        mode="balance",
        clusters=args.clusters,
        target=args.target,
        pick=args.pick,
        resampling_steps=args.resampling_steps,
        niter=args.niter,
        seed=args.seed,
    )
    return PipelineConfig(pool=StoreSpec(store=args.store), select=select, **common)


def _report(summary: dict) -> int:
    if "outputs" not in summary:  # a rank > 0 under torchrun: rank 0 wrote the outputs and reports them
        return 0
    counts = {k: summary[k] for k in ("pool", "duplicates", "contaminated", "selected") if k in summary}
    print(json.dumps(counts))
    print(f"outputs: {summary['outputs']['selected']}, {summary['outputs']['manifest']}")
    return 0


def _run_stages(args: argparse.Namespace) -> int:
    return _report(run_pipeline(_pipeline_from_args(args)))


def _run_config(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output is not None else [])
    return _report(run_pipeline(load_pipeline_config(args.config, overrides)))
