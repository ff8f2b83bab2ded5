"""Automatic data curation (DINOv2 LVD-142M recipe, and seedless hierarchical k-means curation).

embed (sharded, resumable stores) -> deduplicate -> decontaminate -> retrieve around seeds / balance -> outputs.
"""

from dinolab.curation.arrays import RowSubset, ShardedArray
from dinolab.curation.decontaminate import DecontaminationResult, decontaminate
from dinolab.curation.dedup import DedupResult, deduplicate
from dinolab.curation.embed import EmbedConfig, EmbedResult, ThumbnailEmbedder, TransformConfig, embed_to_store
from dinolab.curation.index import IndexConfig, build_index, choose_kind, knn
from dinolab.curation.kmeans import (
    ClusterTree,
    KMeansConfig,
    KMeansResult,
    allot,
    balanced_sample,
    hierarchical_kmeans,
    kmeans,
)
from dinolab.curation.pipeline import PipelineConfig, load_pipeline_config, run_pipeline
from dinolab.curation.retrieve import Retrieval, retrieve_by_cluster, retrieve_nearest
from dinolab.curation.store import EmbeddingStore, IncompleteStoreError, write_store

__all__ = [
    "ClusterTree",
    "DecontaminationResult",
    "DedupResult",
    "EmbedConfig",
    "EmbedResult",
    "EmbeddingStore",
    "IncompleteStoreError",
    "IndexConfig",
    "KMeansConfig",
    "KMeansResult",
    "PipelineConfig",
    "Retrieval",
    "RowSubset",
    "ShardedArray",
    "ThumbnailEmbedder",
    "TransformConfig",
    "allot",
    "balanced_sample",
    "build_index",
    "choose_kind",
    "decontaminate",
    "deduplicate",
    "embed_to_store",
    "hierarchical_kmeans",
    "kmeans",
    "knn",
    "load_pipeline_config",
    "retrieve_by_cluster",
    "retrieve_nearest",
    "run_pipeline",
    "write_store",
]
