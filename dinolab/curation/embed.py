"""The resumable embedding job: images -> L2-normalised embeddings in a sharded store.

Each shard of inputs is embedded and written atomically on its own (see :mod:`dinolab.curation.store`), so a
job that stops (crash, pre-emption, Ctrl-C) resumes with the first shard that has no record and never redoes
a finished one. Under torchrun every rank takes the shards ``s`` with ``s % world_size == rank``: the ranks
write disjoint files and need no communication.

Models: anything :func:`dinolab.hub.load_backbone` loads (released names, ``vit_small`` random init, our
checkpoints), a TorchScript file (e.g. the public SSCD copy-detection descriptors; give it its own
``TransformConfig``), or ``pixels[:S]``, a model-free thumbnail embedding (the image shrunk to ``S x S``
grey pixels, mean-centred) that is enough to find exact and re-encoded / resized copies.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.curation.store import EmbeddingStore, SourceRange, StoreMeta, paths_digest
from dinolab.data.images import ImageFileDataset, list_images
from dinolab.data.shards import ImageSourceDataset, is_sharded, only_files, open_images
from dinolab.data.transforms import Resolution
from dinolab.features.extract import extract_features
from dinolab.runtime import check_dtype, resolve_device

PIXELS_PREFIX = "pixels"


@dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """How images are prepared for the model (ImageNet normalisation always applies)."""

    resize: int = 256
    """Short side after resizing (bicubic) when ``crop`` > 0; the square side when ``crop`` == 0."""
    crop: int = 224
    """Centre-crop size; 0 resizes the whole image to ``resize x resize`` (SSCD uses 288-320, no crop)."""

    @property
    def resolution(self) -> Resolution:
        return Resolution.from_resize_crop(self.resize, self.crop)

    def __post_init__(self) -> None:
        self.resolution  # noqa: B018 (validates resize and crop by the one rule every command uses)

    def build(self) -> Callable:
        return self.resolution.transform()


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """One embedding job: which images, which model, where the store goes."""

    model: str
    """Backbone spec (``dinov2_vits14``, ``vit_small``, a checkpoint), a TorchScript file, or ``pixels[:S]``."""
    inputs: tuple[str, ...]
    """Image folders, image files, ``.txt`` path lists, tar shards or ``hf-disk:`` datasets (see docs/scale.md)."""
    store: Path
    """Output store folder (created, or resumed when it already holds this job)."""
    transform: TransformConfig = field(default_factory=TransformConfig)
    shard_size: int = 4096
    """Images per shard: the unit of resumption and of work split between ranks."""
    batch_size: int = 64
    num_workers: int = 2
    dtype: str = "fp32"
    """Compute precision (autocast): fp32, bf16 or fp16."""
    storage_dtype: str = "fp16"
    """Precision on disk: fp16 (half the space) or fp32."""
    device: str | None = None
    """``cuda``, ``cpu`` …; default: the rank's GPU when there is one."""
    rank: int = 0
    world_size: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("embedding needs at least one input folder, image or .txt path list")
        check_dtype(self.dtype)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")


@dataclass
class EmbedResult:
    """What one rank did."""

    store: EmbeddingStore
    embedded_shards: list[int]
    """Shards this call embedded."""
    skipped_shards: list[int]
    """This rank's shards that were already done (resumed)."""
    images: int
    """Images embedded by this call."""
    failures: int
    """Unreadable images met by this call."""
    seconds: float
    """Wall time spent in the embedding loop (model loading excluded)."""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class ThumbnailEmbedder(nn.Module):
    """Model-free copy-detection baseline: grey ``S x S`` thumbnail, mean-centred, flattened ``[B, S*S]``."""

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: Tensor) -> Tensor:
        grey = images.mean(dim=1, keepdim=True)  # [B, 1, H, W]
        thumb = F.adaptive_avg_pool2d(grey, self.size).flatten(1)  # [B, S*S]
        return thumb - thumb.mean(dim=1, keepdim=True)  # brightness-invariant, like a correlation


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """TorchScript archives hold a ``code/`` folder; plain state-dict files do not."""
    if not Path(path).is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_embedding_model(spec: str) -> nn.Module:
    """The model for ``spec`` (see :class:`EmbedConfig.model`), in eval mode."""
    if spec == PIXELS_PREFIX or spec.startswith(PIXELS_PREFIX + ":"):
        size = int(spec.split(":", 1)[1]) if ":" in spec else 6
        return ThumbnailEmbedder(size).eval()
    if is_torchscript_file(spec):
        return torch.jit.load(spec, map_location="cpu").eval()
    from dinolab.hub import load_backbone

    return load_backbone(spec)


def embedding_features(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The model's output, flattened to ``[B, D]`` and L2-normalised (cosine similarity = inner product)."""
    out = model(images)
    if isinstance(out, dict | tuple | list):
        raise TypeError(f"the embedding model must return one tensor [B, D], got {type(out).__name__}")
    return {"embedding": F.normalize(out.float().flatten(1), dim=1)}


def list_inputs(inputs: Sequence[str]) -> tuple[list[str], list[SourceRange]]:
    """All input paths, in order, and which source each range came from."""
    paths: list[str] = []
    sources: list[SourceRange] = []
    for source in inputs:
        found = open_images(source).names() if is_sharded(source) else [str(p) for p in list_images(source)]
        sources.append(SourceRange(source=str(source), start=len(paths), stop=len(paths) + len(found)))
        paths.extend(found)
    if not paths:
        raise FileNotFoundError(f"no images found in {list(inputs)}")
    return paths, sources


def embed_to_store(
    config: EmbedConfig,
    model: nn.Module | None = None,
    after_shard: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed this rank's unfinished shards into ``config.store``.

    ``model`` overrides loading ``config.model`` (which still names the store's model); ``after_shard`` is
    called with each shard number once it is on disk (progress reporting; tests use it to simulate a crash).
    """
    paths, sources = list_inputs(config.inputs)
    meta = StoreMeta(
        model=config.model,
        transform={"resize": config.transform.resize, "crop": config.transform.crop},
        storage_dtype=config.storage_dtype,
        shard_size=config.shard_size,
        num_inputs=len(paths),
        paths_sha1=paths_digest(paths),
        sources=sources,
    )
    store = EmbeddingStore.create(config.store, meta, paths)
    mine = range(config.rank, meta.num_shards, config.world_size)
    todo = [s for s in mine if not store.is_done(s)]
    skipped = [s for s in mine if s not in set(todo)]
    if not todo:
        return EmbedResult(store, [], skipped, 0, 0, 0.0)

    sharded = None if only_files(config.inputs) else open_images(config.inputs)  # tar shards / hf-disk: datasets
    model = model if model is not None else load_embedding_model(config.model)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", config.rank)))
    transform = config.transform.build()
    images = failures = 0
    start_time = time.perf_counter()
    for shard in todo:
        start, stop = store.shard_range(shard)
        shard_paths = paths[start:stop]
        if sharded is None:
            dataset = ImageFileDataset(shard_paths, transform)
        else:
            dataset = ImageSourceDataset(sharded, transform, np.arange(start, stop))
        extracted = extract_features(
            model,
            dataset,
            feature_fn=embedding_features,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            dtype=config.dtype,
            device=device,
            progress=config.progress,
            description=f"shard {shard}/{meta.num_shards}",
        )
        vectors = extracted.features.get("embedding", np.zeros((0, 0), dtype=np.float32))  # [n, D]
        order = np.argsort(extracted.indices, kind="stable")  # rows in input order whatever the loader did
        bad = sorted(extracted.failures)
        store.write_shard(
            shard,
            vectors[order],
            [shard_paths[i] for i in extracted.indices[order]],
            [(start + i, shard_paths[i], error) for i, error in bad],
        )
        images += len(vectors)
        failures += len(bad)
        if after_shard is not None:
            after_shard(shard)
    return EmbedResult(store, todo, skipped, images, failures, time.perf_counter() - start_time)
