"""``dinolab shards``: image folders / path lists -> WebDataset tar shards with a manifest, resumably.

Layout of the output folder::

    OUT/000000.tar …      shard s holds inputs [s * shard_size, (s + 1) * shard_size) in input order
    OUT/manifest.json     inputs digest, shard size, and per finished shard: name, count, bytes, sha256

Sample ``i`` of the inputs has key ``%09d`` (its input number): the image file's bytes, verbatim, under its own
extension (no re-encoding: the shards decode to exactly the folder's pixels) and ``path.txt`` (its original path).
Files that cannot be read (permissions, vanished) are left out and listed in the manifest; corrupt image bytes are
copied as they are and skipped at read time, like corrupt files in a folder.

Each shard is written to a temporary name and renamed when complete, and the manifest is rewritten after each one,
so an interrupted conversion resumes with the first shard the manifest does not list.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dinolab.data.images import format_path_line, scan_images
from dinolab.data.shards import MANIFEST, _need, read_manifest
from dinolab.runtime import atomic_write_json

FORMAT = "dinolab-shards/1"


@dataclass
class ShardResult:
    output: Path
    shards: int
    written: list[int]
    """Shards written by this call (the others were already done)."""
    images: int
    unreadable: int


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for path in paths:
        h.update(os.fsencode(path) + b"\n")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    output: str | os.PathLike,
    shard_size: int = 1000,
    after_shard: Callable[[int], None] | None = None,
) -> ShardResult:
    """Convert the images of ``sources`` (folders, files, ``.txt`` lists; the order of
    :func:`~dinolab.data.images.scan_images`) into tar shards of ``shard_size`` samples in ``output``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    paths = scan_images(sources).paths
    if not paths:
        raise FileNotFoundError(f"no images found in {sources!r}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(paths) // shard_size)
    manifest = {
        "format": FORMAT,
        "shard_size": shard_size,
        "num_inputs": len(paths),
        "inputs_sha1": _digest(paths),
        "shards": [],
        "unreadable": [],
        "complete": False,
    }
    if (out / MANIFEST).is_file():
        previous = read_manifest(out)
        if {k: previous.get(k) for k in ("shard_size", "num_inputs", "inputs_sha1")} != {
            k: manifest[k] for k in ("shard_size", "num_inputs", "inputs_sha1")
        }:
            raise ValueError(f"{out} holds shards of other inputs or another shard size; use an empty folder")
        manifest = previous
    done = {shard["index"] for shard in manifest["shards"] if (out / shard["name"]).is_file()}
    manifest["shards"] = [shard for shard in manifest["shards"] if shard["index"] in done]
    written = []
    for s in range(num_shards):
        if s in done:
            continue
        record, unreadable = _write_one(paths, s, shard_size, out)
        manifest["shards"] = sorted([*manifest["shards"], record], key=lambda r: r["index"])
        manifest["unreadable"] = [u for u in manifest["unreadable"] if u["shard"] != s] + unreadable
        manifest["complete"] = len(manifest["shards"]) == num_shards
        atomic_write_json(out / MANIFEST, manifest)
        written.append(s)
        if after_shard is not None:
            after_shard(s)
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    images = sum(shard["count"] for shard in manifest["shards"])
    return ShardResult(out, num_shards, written, images, len(manifest["unreadable"]))


def _write_one(paths: Sequence[Path], shard: int, shard_size: int, out: Path) -> tuple[dict, list[dict]]:
    webdataset = _need("webdataset")
    name = f"{shard:06d}.tar"
    tmp = out / f".tmp_{name}"
    count, unreadable = 0, []
    # a fixed mtime makes the shards of the same inputs byte-identical (and their checksums reproducible)
    with webdataset.TarWriter(str(tmp), encoder=False, mtime=0.0) as writer:
        for i in range(shard * shard_size, min((shard + 1) * shard_size, len(paths))):
            path = paths[i]
            try:
                data = path.read_bytes()
            except OSError as error:
                unreadable.append({"shard": shard, "path": format_path_line(path), "error": str(error)})
                continue
            ext = path.suffix.lower().lstrip(".")
            writer.write({"__key__": f"{i:09d}", ext: data, "path.txt": format_path_line(path).encode("utf-8")})
            count += 1
    os.replace(tmp, out / name)
    record = {"index": shard, "name": name, "count": count, "bytes": (out / name).stat().st_size}
    record["sha256"] = _sha256(out / name)
    return record, unreadable


def verify_shards(folder: str | os.PathLike) -> list[str]:
    """Names of the shards whose size or sha256 differs from the manifest (empty when all are intact)."""
    folder = Path(folder)
    bad = []
    for shard in read_manifest(folder)["shards"]:
        path = folder / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or _sha256(path) != shard["sha256"]:
            bad.append(shard["name"])
    return bad
