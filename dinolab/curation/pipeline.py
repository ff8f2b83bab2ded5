"""The curation pipeline: (embed) -> deduplicate -> decontaminate -> retrieve / balance -> outputs.

Every ``dinolab curate`` subcommand is this pipeline with some stages present. The pool is the store named
by ``pool``; the other stages may bring their own stores (a copy-detection embedding for deduplication, the
evaluation sets, the seed sets), matched to the pool by image path. Each stage only sees the images that the
previous stages kept, and records why it dropped the others.

A config file (TOML or JSON) mirrors :class:`PipelineConfig`; see docs/curation.md for a full example.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from dinolab.config import apply_overrides, from_dict, read_config_file, to_dict
from dinolab.curation import distributed, report
from dinolab.curation.arrays import ArrayLike, RowSubset, ShardedArray
from dinolab.curation.decontaminate import decontaminate
from dinolab.curation.embed import EmbedConfig, TransformConfig, embed_to_store
from dinolab.curation.index import IndexConfig, choose_kind
from dinolab.curation.kmeans import KMeansConfig
from dinolab.curation.retrieve import retrieve_by_cluster, retrieve_nearest
from dinolab.curation.store import EmbeddingStore
from dinolab.runtime import world

SELECT_MODES = ("all", "sample", "cluster", "balance")


# ------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    """Embedding settings shared by every store the pipeline has to build."""

    shard_size: int = 4096
    batch_size: int = 64
    num_workers: int = 2
    dtype: str = "fp32"
    storage_dtype: str = "fp16"
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class StoreSpec:
    """An embedding store; with ``model`` and ``inputs`` it is embedded (or finished) first."""

    store: Path
    model: str | None = None
    inputs: tuple[str, ...] = ()
    resize: int = 256
    crop: int = 224

    def __post_init__(self) -> None:
        if bool(self.inputs) != bool(self.model):
            raise ValueError(f"store {self.store}: give both model and inputs to embed it, or neither to reuse it")


@dataclass(frozen=True, kw_only=True)
class DedupStage:
    threshold: float = 0.95
    """Pairs with cosine similarity >= threshold are duplicates."""
    k: int = 16
    """Neighbours examined per image."""
    store: StoreSpec | None = None
    """Copy-detection embedding of the pool (e.g. SSCD); default: the pool store."""


@dataclass(frozen=True, kw_only=True)
class DecontaminateStage:
    eval: tuple[StoreSpec, ...] = ()
    """Evaluation sets, embedded with the same model as ``store``."""
    threshold: float = 0.95
    store: StoreSpec | None = None
    """Pool embedding compared with the evaluation sets; default: the pool store."""

    def __post_init__(self) -> None:
        if not self.eval:
            raise ValueError("decontamination needs at least one evaluation store")


@dataclass(frozen=True, kw_only=True)
class SelectStage:
    mode: str = "all"
    """``all`` (keep every survivor), ``sample`` / ``cluster`` (retrieve around seeds), ``balance`` (seedless)."""
    seeds: tuple[StoreSpec, ...] = ()
    """Curated seed sets (sample / cluster modes), embedded with the pool's model."""
    n: int = 4
    """sample mode: nearest pool images per seed image."""
    m: int = 100
    """cluster mode: pool images taken from the cluster of each seed image."""
    clusters: tuple[int, ...] = (1000, 100, 10)
    """cluster mode: the first value is the number of k-means clusters; balance mode: clusters per level."""
    target: int | None = None
    """balance mode: number of images to keep."""
    pick: str = "nearest"
    """``nearest`` (to the seed / leaf centroid) or ``random``."""
    resampling_steps: int = 0
    """balance mode: resampling refinements per level (levels above the first; Vo et al. skip level 1)."""
    niter: int = 20
    """k-means iterations."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SELECT_MODES:
            raise ValueError(f"select mode must be one of {SELECT_MODES}, got {self.mode!r}")
        if self.mode in ("sample", "cluster") and not self.seeds:
            raise ValueError(f"select mode {self.mode!r} needs at least one seed store")
        if self.mode == "balance" and (self.target is None or self.target < 1):
            raise ValueError("select mode 'balance' needs target >= 1 (the number of images to keep)")
        if self.pick not in ("nearest", "random"):
            raise ValueError(f"pick must be 'nearest' or 'random', got {self.pick!r}")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """A whole curation run."""

    pool: StoreSpec
    """The uncurated pool (its embeddings drive retrieval / balancing)."""
    output: Path
    """Output folder: selected.txt, manifest, summary.json/md, plots/."""
    dedup: DedupStage | None = None
    decontaminate: DecontaminateStage | None = None
    select: SelectStage = field(default_factory=SelectStage)
    index: IndexConfig = field(default_factory=IndexConfig)
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    manifest_format: str = "csv"
    """``csv`` or ``parquet``."""
    command: str = "run"
    """Name shown in the summary."""

    def __post_init__(self) -> None:
        if self.manifest_format not in ("csv", "parquet"):
            raise ValueError(f"manifest_format must be 'csv' or 'parquet', got {self.manifest_format!r}")


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a TOML / JSON pipeline config, with ``section.key=value`` overrides (``select.target=1000``);
    relative paths stay relative to the working directory."""
    return apply_overrides(from_dict(PipelineConfig, read_config_file(path)), list(overrides or []))


# ---------------------------------------------------------------------------------------------- execution
def open_store(spec: StoreSpec, options: EmbedOptions) -> EmbeddingStore:
    """Embed (or finish embedding) ``spec`` when it names a model and inputs, then open it complete."""
    if spec.model:
        embed_to_store(
            EmbedConfig(
                model=spec.model,
                inputs=tuple(spec.inputs),
                store=Path(spec.store),
                transform=TransformConfig(resize=spec.resize, crop=spec.crop),
                shard_size=options.shard_size,
                batch_size=options.batch_size,
                num_workers=options.num_workers,
                dtype=options.dtype,
                storage_dtype=options.storage_dtype,
                device=options.device,
                rank=world()[0],
                world_size=world()[1],
                progress=world()[0] == 0,
            )
        )
        distributed.barrier()  # under torchrun every rank embedded its own shards: wait for all of them
    return EmbeddingStore.open(spec.store)


def store_dim(spec: StoreSpec) -> int | None:
    """The embedding size of a store, known without embedding anything: from a shard already written, else from its
    model (loaded, and run on one blank image); None when neither exists yet."""
    root = Path(spec.store)
    if (root / "store.json").is_file():
        store = EmbeddingStore.open(root, require_complete=False)
        dims = {store.shard_record(s)["dim"] for s in store.done_shards()} - {0}
        if dims:
            return dims.pop()
    if not spec.model:
        return None
    import torch

    from dinolab.curation.embed import embedding_features, load_embedding_model

    side = spec.crop or spec.resize
    with torch.no_grad():
        out = embedding_features(load_embedding_model(spec.model), torch.zeros(1, 3, side, side))["embedding"]
    return int(out.shape[1])


def check_decontamination_dims(config: PipelineConfig) -> None:
    """The evaluation stores of decontamination must have the dimension of the pool embedding they are compared
    with (the same model); raise ``ValueError`` naming the stores otherwise."""
    stage = config.decontaminate
    if stage is None:
        return
    compared = stage.store or config.pool
    pool_dim = store_dim(compared)
    if pool_dim is None:
        return
    wrong = [(spec.store, dim) for spec in stage.eval if (dim := store_dim(spec)) not in (None, pool_dim)]
    if wrong:
        listed = ", ".join(f"{store} ({dim})" for store, dim in wrong)
        raise ValueError(
            f"decontamination compares {compared.store} ({pool_dim}-dimensional embeddings) with evaluation stores "
            f"of another dimension: {listed}; embed the evaluation sets with the model of {compared.store}"
        )


def aligned_vectors(store: EmbeddingStore, paths: list[str], what: str) -> ArrayLike:
    """``store``'s rows reordered to follow ``paths`` (the pool's rows); every path must be in the store."""
    if store.paths() == paths:
        return store.vectors()
    row_of = {p: i for i, p in enumerate(store.paths())}
    missing = [p for p in paths if p not in row_of]
    if missing:
        raise ValueError(
            f"{what} store {store.root} lacks {len(missing)} of the pool's images (e.g. {missing[0]}); "
            "embed the same inputs into it"
        )
    return RowSubset(store.vectors(), np.array([row_of[p] for p in paths], dtype=np.int64))


# why a pool row is in or out: the manifest's ``reason`` column
KEPT = "kept"
DUPLICATE = "duplicate"
CONTAMINATED = "contaminated"
RETRIEVED = "retrieved"
NOT_RETRIEVED = "not-retrieved"
SAMPLED = "sampled"
NOT_SAMPLED = "not-sampled"
UNREADABLE = "unreadable"


@dataclass
class CurationState:
    """Per pool row: alive or not, and what the manifest will say."""

    paths: list[str]
    sources: list[str]
    alive: np.ndarray  # [N] bool
    reason: list[str]
    similarity: np.ndarray  # [N] float32
    twin: list[str]
    cluster: np.ndarray  # [N] int64

    @classmethod
    def start(cls, store: EmbeddingStore) -> CurationState:
        n = len(store)
        return cls(
            store.paths(),
            store.row_sources(),
            np.ones(n, dtype=bool),
            [KEPT] * n,
            np.full(n, np.nan, dtype=np.float32),
            [""] * n,
            np.full(n, -1, dtype=np.int64),
        )

    def drop(self, rows: np.ndarray, reason: str, similarity: np.ndarray, twins: list[str]) -> None:
        self.alive[rows] = False
        for row, sim, twin in zip(rows, similarity, twins):
            self.reason[row], self.similarity[row], self.twin[row] = reason, sim, twin


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages and write the outputs; returns the summary (also in summary.json)."""
    out = Path(config.output)
    # under torchrun, deduplication and balancing are split across the ranks (the results gathered on every rank:
    # the same as one process); rank 0 writes the outputs, the others' plots go to a scratch folder
    multi = distributed.init_from_env()
    rank = world()[0]
    plots_dir = out / "plots" if rank == 0 else Path(tempfile.mkdtemp(prefix=f"dinolab_rank{rank}_"))
    summary: dict[str, Any] = {"command": config.command}
    timings: dict[str, float] = {}

    check_decontamination_dims(config)  # before anything is embedded: a mismatch found later wastes the embedding
    tick = time.perf_counter()
    pool_store = open_store(config.pool, config.embed)
    timings["embed_pool_s"] = time.perf_counter() - tick
    state = CurationState.start(pool_store)
    pool: ArrayLike = pool_store.vectors()
    summary.update(
        inputs=pool_store.meta.num_inputs,
        unreadable=len(pool_store.failures()),
        pool=len(state.paths),
        model=pool_store.meta.model,
        index=choose_kind(len(state.paths), pool.shape[1], config.index),
    )

    stages = [
        ("dedup", _dedup, config.dedup is not None),
        ("decontaminate", _decontaminate, config.decontaminate is not None),
        ("select", _select, True),
    ]
    reports: list[StageReport] = []
    for name, stage, present in stages:
        if present:
            tick = time.perf_counter()
            reports.append(stage(config, state, pool, plots_dir))
            timings[f"{name}_s"] = time.perf_counter() - tick
            summary.update(reports[-1].numbers())
    plots = [path for stage_report in reports for path in stage_report.plots]

    kept = [p for p, a in zip(state.paths, state.alive) if a]
    if rank != 0:
        shutil.rmtree(plots_dir, ignore_errors=True)
        distributed.barrier()  # rank 0 writes the outputs
        return summary
    failures = pool_store.failures()
    manifest = report.Manifest(
        path=state.paths + [f["path"] for f in failures],
        source=state.sources + pool_store.sources_of([f["index"] for f in failures]),
        kept=np.concatenate([state.alive, np.zeros(len(failures), dtype=bool)]),
        reason=state.reason + [UNREADABLE] * len(failures),
        cluster=np.concatenate([state.cluster, np.full(len(failures), -1, dtype=np.int64)]),
        similarity=np.concatenate([state.similarity, np.full(len(failures), np.nan, dtype=np.float32)]),
        twin=state.twin + [f["error"] for f in failures],
    )
    selected = report.write_path_list(kept, out / "selected.txt")
    manifest_path = report.write_manifest(manifest, out / f"manifest.{config.manifest_format}")
    summary.update(selected=len(kept), outputs={"selected": selected, "manifest": manifest_path})
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    summary["config"] = to_dict(config)
    summary["processes"] = world()[1]
    report.write_summary(summary, out, plots)
    if multi:
        distributed.barrier()
    return summary


# ----------------------------------------------------------------------------------------------- stages
@dataclass(kw_only=True)
class StageReport:
    """What a stage reports: its numbers for summary.json (a field left None does not apply) and its plots."""

    plots: list[Path] = field(default_factory=list)

    def numbers(self) -> dict[str, Any]:
        return {f.name: v for f in fields(self) if f.name != "plots" and (v := getattr(self, f.name)) is not None}


@dataclass(kw_only=True)
class DedupReport(StageReport):
    duplicates: int
    """Images removed as copies of a kept one."""
    duplicate_groups: int
    """Groups of copies the removed images belonged to."""


@dataclass(kw_only=True)
class DecontaminateReport(StageReport):
    contaminated: int
    """Images removed for matching an evaluation image."""


@dataclass(kw_only=True)
class SelectReport(StageReport):
    select_mode: str
    seeds: int | None = None
    """Retrieval: seed images."""
    target: int | None = None
    """Balancing: images asked for."""
    levels: list[int] | None = None
    """Balancing: clusters per level of the hierarchical k-means."""
    largest_cluster_share_before: float | None = None
    largest_cluster_share_after: float | None = None


def _stage_vectors(
    store: StoreSpec | None, config: PipelineConfig, state: CurationState, pool: ArrayLike, purpose: str
) -> ArrayLike:
    """The pool's vectors for one stage: its own embedding store (e.g. a copy-detection one), aligned to the pool's
    paths, or the pool embedding."""
    if store is None:
        return pool
    return aligned_vectors(open_store(store, config.embed), state.paths, purpose)


def _dedup(config: PipelineConfig, state: CurationState, pool: ArrayLike, plots_dir: Path) -> DedupReport:
    stage = config.dedup
    x = _stage_vectors(stage.store, config, state, pool, "deduplication")
    alive = np.nonzero(state.alive)[0]
    result = distributed.deduplicate_everywhere(RowSubset(x, alive), stage.threshold, stage.k, config.index)
    removed = np.nonzero(~result.keep)[0]
    twins = [state.paths[alive[t]] for t in result.twin[removed]]
    state.drop(alive[removed], DUPLICATE, result.similarity[removed], twins)
    plot = report.plot_similarity_histogram(
        result.pair_similarities, stage.threshold, "k-NN pair similarity (dedup)", plots_dir / "dedup_similarity.png"
    )
    groups = len(np.unique(result.component[removed]))
    return DedupReport(duplicates=result.num_removed, duplicate_groups=groups, plots=[plot])


def _decontaminate(
    config: PipelineConfig, state: CurationState, pool: ArrayLike, plots_dir: Path
) -> DecontaminateReport:
    stage = config.decontaminate
    x = _stage_vectors(stage.store, config, state, pool, "decontamination")
    eval_stores = [open_store(spec, config.embed) for spec in stage.eval]
    eval_paths = [s.paths() for s in eval_stores]
    alive = np.nonzero(state.alive)[0]
    result = decontaminate(RowSubset(x, alive), [s.vectors() for s in eval_stores], stage.threshold, config.index)
    dropped = np.nonzero(result.drop)[0]
    twins = [eval_paths[result.match_set[r]][result.match[r]] for r in dropped]
    state.drop(alive[dropped], CONTAMINATED, result.similarity[dropped], twins)
    plot = report.plot_similarity_histogram(
        result.similarity, stage.threshold, "max similarity to evaluation images", plots_dir / "eval_similarity.png"
    )
    return DecontaminateReport(contaminated=result.num_dropped, plots=[plot])


def _select(config: PipelineConfig, state: CurationState, pool: ArrayLike, plots_dir: Path) -> SelectReport:
    stage = config.select
    out = SelectReport(select_mode=stage.mode)
    if stage.mode == "all":
        return out
    alive = np.nonzero(state.alive)[0]
    x = RowSubset(pool, alive)
    kmeans_config = KMeansConfig(niter=stage.niter, seed=stage.seed)
    clusters_before = None
    if stage.mode in ("sample", "cluster"):
        seed_stores = [open_store(spec, config.embed) for spec in stage.seeds]
        seed_paths = [p for s in seed_stores for p in s.paths()]
        seeds = ShardedArray([part for s in seed_stores for part in s.vectors().parts])
        if stage.mode == "sample":
            result = retrieve_nearest(x, seeds, stage.n, config.index)
        else:
            result = retrieve_by_cluster(x, seeds, min(stage.clusters[0], len(x)), stage.m, stage.pick, kmeans_config)
            state.cluster[alive] = result.pool_cluster
            clusters_before = np.bincount(result.pool_cluster, minlength=min(stage.clusters[0], len(x)))
        chosen = result.selected
        best, seed_of = result.best_seed(len(x))
        reason_in, reason_out = RETRIEVED, NOT_RETRIEVED
        out.plots.append(
            report.plot_similarity_histogram(
                result.similarity[result.neighbors >= 0],
                None,
                "seed-to-retrieved similarity",
                plots_dir / "retrieval_similarity.png",
            )
        )
        state.similarity[alive[chosen]] = best[chosen]
        for r in chosen:
            state.twin[alive[r]] = seed_paths[seed_of[r]]
        out.seeds = len(seeds)
    else:
        levels = [min(k, len(x)) for k in stage.clusters]
        steps = [0] + [stage.resampling_steps] * (len(levels) - 1)
        tree, chosen = distributed.balance_everywhere(
            x, levels, kmeans_config, steps, stage.target, stage.pick, stage.seed
        )
        state.cluster[alive] = tree.levels[0].assignment
        clusters_before = tree.sizes(0)
        reason_in, reason_out = SAMPLED, NOT_SAMPLED
        out.target, out.levels = stage.target, levels
    is_chosen = np.zeros(len(x), dtype=bool)
    is_chosen[chosen] = True
    for r, c in zip(alive, is_chosen):
        state.reason[r] = reason_in if c else reason_out
    state.alive[alive[~is_chosen]] = False
    if clusters_before is not None:
        labels = state.cluster[alive]
        after = np.bincount(labels[is_chosen], minlength=len(clusters_before))
        out.plots.append(
            report.plot_cluster_sizes(clusters_before, after, plots_dir / "cluster_sizes.png", "cluster sizes (leaves)")
        )
        out.largest_cluster_share_before = round(float(clusters_before.max() / max(clusters_before.sum(), 1)), 6)
        out.largest_cluster_share_after = round(float(after.max() / max(after.sum(), 1)), 6)
    return out
