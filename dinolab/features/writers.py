"""Writing embeddings to disk: ``.npy`` arrays, Parquet or safetensors, plus ``paths.txt``, ``failed.txt`` and
``summary.json``.

Row ``i`` of every feature array belongs to line ``i`` of ``paths.txt`` (and row ``i`` of the Parquet table). Paths
round-trip exactly, whatever bytes they hold: see :func:`~dinolab.data.images.format_path_line`.

The files are written as one set (:class:`~dinolab.runtime.OutputDir`): into a temporary folder, renamed over the
output folder only when all are complete, so a folder never mixes files of two runs or holds half a set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from dinolab.data.images import format_path_line, parse_path_line
from dinolab.features.embed import OUTPUTS, EmbeddingResult
from dinolab.runtime import OutputDir

FORMATS = ("npy", "parquet", "safetensors")
PARQUET_FILE = "embeddings.parquet"
SAFETENSORS_FILE = "embeddings.safetensors"
LIST_FILES = ("paths.txt", "failed.txt", "summary.json")


def is_embedding_file(name: str) -> bool:
    """Whether ``name`` is a file ``dinolab embed`` writes (an output folder may hold only those)."""
    return name in LIST_FILES or name in (PARQUET_FILE, SAFETENSORS_FILE) or name in {f"{o}.npy" for o in OUTPUTS}


def embedding_output(out_dir: str | os.PathLike) -> OutputDir:
    """The output folder, checked before any work: not a file, writable, holding nothing but an earlier
    ``dinolab embed`` output (which the new set replaces whole)."""
    return OutputDir(out_dir, owned=is_embedding_file)


def require_pyarrow() -> ModuleType:
    """Import pyarrow, or explain how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # the submodule must be importable too
    except ImportError as error:
        raise ImportError(
            "--format parquet needs pyarrow, which is not installed; run `pip install 'dinolab[parquet]'` "
            "(or `pip install pyarrow`), or use --format npy / safetensors"
        ) from error
    return pyarrow


def check_formats(formats: Sequence[str]) -> list[str]:
    """Validate the output formats (and their optional dependencies) before any work is done."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; choose from {list(FORMATS)}")
    if "parquet" in formats:
        require_pyarrow()
    return list(dict.fromkeys(formats))


def write_npy(features: Mapping[str, np.ndarray], out_dir: Path) -> list[Path]:
    """One ``NAME.npy`` per output."""
    written = []
    for name, array in features.items():
        np.save(out_dir / f"{name}.npy", array)
        written.append(out_dir / f"{name}.npy")
    return written


def _fixed_size_list_column(array: np.ndarray):
    """``[N, d1, ..., dk]`` float32 -> a pyarrow column of nested fixed-size lists (``d1`` of ... of ``dk``)."""
    pa = require_pyarrow()
    column = pa.array(np.ascontiguousarray(array, dtype=np.float32).reshape(-1))
    for size in reversed(array.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def write_parquet(
    paths: Sequence[Path], features: Mapping[str, np.ndarray], target: Path, metadata: Mapping[str, object]
) -> Path:
    """A table with a ``path`` column and one fixed-size-list column per output (nested for token outputs)."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    columns = {"path": pa.array([format_path_line(p) for p in paths], type=pa.string())}
    columns.update({name: _fixed_size_list_column(array) for name, array in features.items()})
    table = pa.table(columns).replace_schema_metadata({"dinolab": json.dumps(metadata)})
    pq.write_table(table, target)
    return target


def read_parquet_features(path: str | os.PathLike) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read a file written by :func:`write_parquet` back into paths and ``[N, ...]`` float32 arrays."""
    require_pyarrow()
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    paths = [parse_path_line(p) for p in table.column("path").to_pylist()]
    features = {}
    for name in table.column_names:
        if name == "path":
            continue
        column = table.column(name).combine_chunks()
        shape = []
        while hasattr(column.type, "list_size"):
            shape.append(column.type.list_size)
            column = column.flatten()
        features[name] = column.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(paths), *shape)
    return paths, features


def write_safetensors(features: Mapping[str, np.ndarray], target: Path, metadata: Mapping[str, object]) -> Path:
    """All outputs in one ``.safetensors`` file; the metadata names the model and points to ``paths.txt``."""
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(array) for name, array in features.items()}
    save_file(tensors, str(target), metadata={key: json.dumps(value) for key, value in metadata.items()})
    return target


def write_embeddings(
    result: EmbeddingResult,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("npy",),
    summary: Mapping[str, object] | None = None,
    staging: OutputDir | None = None,
) -> dict[str, list[str]]:
    """Write features (in each of ``formats``), ``paths.txt``, ``failed.txt`` and ``summary.json`` to ``out_dir``,
    as one set that replaces an earlier output whole (see the module docstring).

    ``staging``: the :func:`embedding_output` of ``out_dir`` when it was checked before the work (the command line
    does). Returns the written file names by kind; they are also listed in ``summary.json`` under ``"files"``.
    """
    formats = check_formats(formats)
    rows = {name: len(array) for name, array in result.features.items()}
    if any(count != len(result.paths) for count in rows.values()):
        raise ValueError(f"{len(result.paths)} paths but feature rows {rows}: rows and paths must agree")
    with staging or embedding_output(out_dir) as output:
        return _write_set(result, output.path, formats, dict(summary or {}))


def _write_set(
    result: EmbeddingResult, out_dir: Path, formats: list[str], summary: dict[str, object]
) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    (out_dir / "paths.txt").write_text("".join(f"{format_path_line(p)}\n" for p in result.paths), encoding="utf-8")
    # one line per failure: the error text is flattened so the file stays "path<TAB>error" per line
    (out_dir / "failed.txt").write_text(
        "".join(f"{format_path_line(p)}\t{' '.join(err.split())}\n" for p, err in result.failed), encoding="utf-8"
    )
    files["lists"] = ["paths.txt", "failed.txt"]
    metadata = {"model": summary.get("model"), "rows": len(result.paths), "paths_file": "paths.txt"}
    if "npy" in formats:
        files["npy"] = [p.name for p in write_npy(result.features, out_dir)]
    if "parquet" in formats:
        files["parquet"] = [write_parquet(result.paths, result.features, out_dir / PARQUET_FILE, metadata).name]
    if "safetensors" in formats:
        files["safetensors"] = [write_safetensors(result.features, out_dir / SAFETENSORS_FILE, metadata).name]
    summary["files"] = files
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    files["summary"] = ["summary.json"]
    return files


def summarize(
    result: EmbeddingResult,
    *,
    model_name: str,
    model: object,
    dtype: str,
    device: str,
    resolution: Mapping[str, object],
    **extra: object,
) -> dict[str, object]:
    """The ``summary.json`` content: model, counts, output shapes, precision, resolution, timing, throughput."""
    return {
        "model": model_name,
        "arch": {
            "embed_dim": getattr(model, "embed_dim", None),
            "patch_size": getattr(model, "patch_size", None),
            "n_blocks": getattr(model, "n_blocks", None),
            "num_register_tokens": getattr(model, "num_register_tokens", None),
        },
        "counts": {"requested": result.num_requested, "embedded": len(result.paths), "failed": len(result.failed)},
        "outputs": {name: list(array.shape) for name, array in result.features.items()},
        "compute_dtype": dtype,
        "storage_dtype": "float32",
        "device": device,
        "resolution": dict(resolution),
        "input_size": list(result.input_size),
        "patch_grid": list(result.patch_grid),
        "timing": {"embed_s": round(result.seconds, 4)},
        "images_per_s": round(result.images_per_s, 3),
        "failed": [{"path": str(p), "error": err} for p, err in result.failed],
        **extra,
    }
