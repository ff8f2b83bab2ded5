"""Sharded on-disk embedding stores, written incrementally and read back memory-mapped.

Layout of a store folder::

    store.json              what was embedded: model, transform, shard size, number of inputs, the sources
    paths.txt               every input path, in order (row ``i`` of the inputs is line ``i``)
    shards/shard_00000.npy  [n, D] L2-normalised embeddings (fp16 or fp32) of the readable images of the shard
    shards/shard_00000.txt  the paths of those n rows, one per line
    shards/shard_00000.json the shard's "done" record: its input range, row count, dim and unreadable images

Shard ``s`` covers inputs ``[s * shard_size, (s + 1) * shard_size)``. Every file is written to a temporary
name and renamed into place, and the ``.json`` record is written last, so a shard either has its record and
complete files or counts as not done: an interrupted job resumes by redoing only the shards without records.

Rows of the store are the readable images in input order; :meth:`EmbeddingStore.vectors` reads them back as a
:class:`dinolab.curation.arrays.ShardedArray` over the memory-mapped shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinolab.curation.arrays import ArrayLike, ShardedArray
from dinolab.data.images import format_path_line, parse_path_line
from dinolab.runtime import atomic_write, atomic_write_json, atomic_write_text

STORE_FILE = "store.json"
PATHS_FILE = "paths.txt"
SHARD_DIR = "shards"
STORAGE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- atomic writes
def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to a temporary file, then rename: readers never see half an array."""
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


# -------------------------------------------------------------------------------------------------- the store
@dataclass(frozen=True, kw_only=True)
class SourceRange:
    """Inputs ``[start, stop)`` came from ``source`` (a folder, a path list or an image file)."""

    source: str
    start: int
    stop: int


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """What a store holds; a resumed job must match it exactly."""

    model: str
    """Backbone spec the embeddings came from."""
    transform: dict[str, Any]
    """Image preprocessing options (resize/crop sizes)."""
    storage_dtype: str
    """``fp16`` or ``fp32`` on disk."""
    shard_size: int
    """Inputs per shard."""
    num_inputs: int
    """Number of input paths (readable or not)."""
    paths_sha1: str
    """Digest of paths.txt: a resumed job must see the same inputs in the same order."""
    sources: list[SourceRange] = field(default_factory=list)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_inputs // self.shard_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StoreMeta:
        obj = dict(obj)
        obj["sources"] = [SourceRange(**s) for s in obj.get("sources", [])]
        return cls(**obj)


def paths_digest(paths: Sequence[str]) -> str:
    # surrogateescape: file names that are not UTF-8 hash as their bytes (UTF-8 names hash as before)
    return hashlib.sha1("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


def _path_lines(paths: Sequence[str]) -> str:
    return "".join(format_path_line(p) + "\n" for p in paths)


def _read_path_lines(path: Path) -> list[str]:
    return [parse_path_line(line) for line in path.read_text(encoding="utf-8").splitlines()]


class IncompleteStoreError(RuntimeError):
    """A store whose embedding job has not finished every shard."""


class EmbeddingStore:
    """A store folder (see the module docstring). Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: Path, meta: StoreMeta) -> None:
        self.root = root
        self.meta = meta

    # ------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, root: str | os.PathLike, meta: StoreMeta, paths: Sequence[str]) -> EmbeddingStore:
        """Start a store, or reopen an existing one for resuming after checking it holds the same job."""
        root = Path(root)
        if meta.paths_sha1 != paths_digest(paths) or meta.num_inputs != len(paths):
            raise ValueError("StoreMeta.paths_sha1/num_inputs do not describe the given paths")
        if (root / STORE_FILE).is_file():
            existing = cls.open(root, require_complete=False)
            if existing.meta != meta:
                raise ValueError(
                    f"{root} already holds a different embedding job (model, transform, dtype, shard size or "
                    f"inputs differ):\n  existing: {existing.meta}\n  requested: {meta}\n"
                    "use another --store folder, or delete this one to start again"
                )
            return existing
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / PATHS_FILE, _path_lines(paths))
        # written last: a folder with store.json has its paths list
        atomic_write_json(root / STORE_FILE, meta.to_json())
        return cls(root, meta)

    @classmethod
    def open(cls, root: str | os.PathLike, require_complete: bool = True) -> EmbeddingStore:
        """Open a store; by default it must be complete (every shard done)."""
        root = Path(root)
        if not (root / STORE_FILE).is_file():
            raise FileNotFoundError(
                f"{root} is not an embedding store (no {STORE_FILE}); create it with `curate embed`"
            )
        store = cls(root, StoreMeta.from_json(json.loads((root / STORE_FILE).read_text())))
        if require_complete and (missing := store.missing_shards()):
            raise IncompleteStoreError(
                f"{root}: {len(missing)} of {store.meta.num_shards} shards are not embedded yet (first: {missing[:5]}); "
                "rerun the same `curate embed` command to finish it"
            )
        return store

    # ------------------------------------------------------------------------------------------------ shards
    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.meta.shard_size
        return start, min(start + self.meta.shard_size, self.meta.num_inputs)

    def shard_file(self, shard: int, suffix: str) -> Path:
        return self.root / SHARD_DIR / f"shard_{shard:05d}{suffix}"

    def is_done(self, shard: int) -> bool:
        return self.shard_file(shard, ".json").is_file()

    def done_shards(self) -> list[int]:
        return [s for s in range(self.meta.num_shards) if self.is_done(s)]

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.meta.num_shards) if not self.is_done(s)]

    def shard_record(self, shard: int) -> dict[str, Any]:
        return json.loads(self.shard_file(shard, ".json").read_text())

    def write_shard(
        self, shard: int, vectors: np.ndarray, row_paths: Sequence[str], failures: Sequence[tuple[int, str, str]]
    ) -> None:
        """Write shard ``shard``: vectors ``[n, D]``, their paths, and ``(input index, path, error)`` failures."""
        start, stop = self.shard_range(shard)
        if len(vectors) + len(failures) != stop - start or len(row_paths) != len(vectors):
            raise ValueError(
                f"shard {shard} covers {stop - start} inputs but got {len(vectors)} vectors, "
                f"{len(row_paths)} paths and {len(failures)} failures"
            )
        save_npy_atomic(self.shard_file(shard, ".npy"), vectors.astype(STORAGE_DTYPES[self.meta.storage_dtype]))
        atomic_write_text(self.shard_file(shard, ".txt"), _path_lines(row_paths))
        record = {
            "shard": shard,
            "start": start,
            "stop": stop,
            "rows": len(vectors),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "failures": [{"index": int(i), "path": p, "error": e} for i, p, e in failures],
        }
        atomic_write_json(self.shard_file(shard, ".json"), record)  # last: marks the shard done

    # ---------------------------------------------------------------------------------------------- reading
    def input_paths(self) -> list[str]:
        return _read_path_lines(self.root / PATHS_FILE)

    def vectors(self, mmap: bool = True) -> ShardedArray:
        """All rows ``[N, D]`` of the (complete) store, memory-mapped unless ``mmap=False``."""
        mode = "r" if mmap else None
        parts = [np.load(self.shard_file(s, ".npy"), mmap_mode=mode) for s in range(self.meta.num_shards)]
        return ShardedArray(parts)

    def row_input_indices(self) -> np.ndarray:
        """For each row, its index among the inputs ``[N]`` (the inputs minus unreadable images)."""
        keep = np.ones(self.meta.num_inputs, dtype=bool)
        for failure in self.failures():
            keep[failure["index"]] = False
        return np.nonzero(keep)[0]

    def paths(self) -> list[str]:
        """The path of each row."""
        return [path for s in range(self.meta.num_shards) for path in _read_path_lines(self.shard_file(s, ".txt"))]

    def row_sources(self) -> list[str]:
        """The input source (folder / path list) each row came from."""
        return self.sources_of(self.row_input_indices())

    def sources_of(self, input_indices: np.ndarray) -> list[str]:
        """The input source of each given input index."""
        starts = np.array([r.start for r in self.meta.sources], dtype=np.int64)
        names = [r.source for r in self.meta.sources]
        if not names:
            return [""] * len(input_indices)
        which = np.searchsorted(starts, np.asarray(input_indices, dtype=np.int64), side="right") - 1
        return [names[i] for i in which]

    def failures(self) -> list[dict[str, Any]]:
        """Unreadable inputs: ``{"index", "path", "error"}`` for every done shard."""
        return [f for s in self.done_shards() for f in self.shard_record(s)["failures"]]

    def __len__(self) -> int:
        return sum(self.shard_record(s)["rows"] for s in self.done_shards())


def write_store(
    root: str | os.PathLike,
    vectors: ArrayLike,
    paths: Sequence[str],
    model: str = "precomputed",
    shard_size: int = 65_536,
    storage_dtype: str = "fp16",
) -> EmbeddingStore:
    """A complete store from embeddings computed elsewhere (rows are L2-normalised on the way in)."""
    if len(vectors) != len(paths):
        raise ValueError(f"{len(vectors)} vectors but {len(paths)} paths")
    paths = [str(p) for p in paths]
    meta = StoreMeta(
        model=model,
        transform={},
        storage_dtype=storage_dtype,
        shard_size=shard_size,
        num_inputs=len(paths),
        paths_sha1=paths_digest(paths),
        sources=[SourceRange(source="precomputed", start=0, stop=len(paths))],
    )
    store = EmbeddingStore.create(root, meta, paths)
    for shard in store.missing_shards():
        start, stop = store.shard_range(shard)
        part = np.asarray(vectors[start:stop], dtype=np.float32)  # [n, D]
        part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        store.write_shard(shard, part, paths[start:stop], [])
    return store
