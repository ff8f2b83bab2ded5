"""Sharded image datasets: WebDataset tar shards and Hugging Face ``datasets``, read by index or streamed.

Sources (anywhere a folder or a ``.txt`` path list is accepted: ``run.data``, ``dinolab embed``, ``curate embed``):

* ``shards/{000000..001023}.tar`` (brace pattern), a ``.tar`` file, or a folder holding ``manifest.json`` (written
  by ``dinolab shards``) or ``*.tar`` files: WebDataset tar shards. Local shards are **indexed** (random access
  through ``wids``, the WebDataset project's indexed reader), so they behave exactly like the equivalent folder:
  same sample order, same batches for the same seed, exact resume from the global stream position.
* ``http(s)://…``, ``pipe:…``, ``s3://…`` shard URLs: **streamed** through ``webdataset`` (its URL / pipe openers).
* ``hf-disk:PATH``: a Hugging Face dataset on disk (``save_to_disk`` output, or an ``imagefolder`` / Parquet /
  Arrow folder ``datasets.load_dataset`` reads), indexed. ``hf-disk:PATH@SPLIT`` picks a split (default ``train``).
* ``hf://ID`` (hub id or local folder, ``@SPLIT`` optional): ``datasets.load_dataset(ID, streaming=True)``, streamed.

Samples that cannot be decoded are skipped and reported (name, error) like unreadable files.

**Streams** (:class:`ShardStream`): the global shard sequence is the concatenation of passes; pass ``q`` visits the
shards in the order of ``torch.randperm(S)`` seeded ``seed + q`` and slot ``g = q * S + j`` is its ``j``-th shard.
With ``C = world_size * max(1, num_workers)`` consumers, consumer ``c`` reads the slots ``g ≡ c (mod C)`` in order,
each shard from start to end: consumers never overlap and a pass gives each shard to exactly one consumer. A
sample's *position* is ``g * SHARD_SPAN + offset`` (its offset inside the shard): it seeds the sample's crops, and the
last position each consumer delivered is the cursor saved in the checkpoint (:class:`StreamCursor`), so a resumed
run re-opens every consumer's shard and skips to the next sample: resume is exact, mid-shard included.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dinolab.data.images import IMAGE_EXTENSIONS, list_images, load_rgb, to_rgb

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HF_DISK = "hf-disk:"
HF_STREAM = "hf://"
SHARD_SPAN = 1 << 32
"""Positions of a stream are ``slot * SHARD_SPAN + offset``: room for 4 billion samples per shard."""
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
MAX_CONSECUTIVE_FAILURES = 1000
_OPEN_SHARDS = 16  # indexed tar shards kept open (memory-mapped) per process


def _indexed_tar(path: str) -> Any:
    _need("wids")
    from wids.wids import IndexedTarSamples

    return IndexedTarSamples(path=path)


def _need(module: str, extra: str = "shards") -> Any:
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(f"reading sharded datasets needs {module!r}: pip install 'dinolab[{extra}]'") from error


# --------------------------------------------------------------------------------------------- classification
def is_sharded(source: str | os.PathLike) -> bool:
    """Whether ``source`` names tar shards or a Hugging Face dataset (rather than image files / folders / lists)."""
    text = os.fspath(source)
    if text.startswith((HF_DISK, HF_STREAM, "pipe:")) or "://" in text:
        return True
    if "{" in text or text.endswith(".tar"):
        return True
    path = Path(text)
    return path.is_dir() and ((path / MANIFEST).is_file() or (any(path.glob("*.tar")) and not _has_images(path)))


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())


def is_streamed(source: str | os.PathLike) -> bool:
    """Whether ``source`` can only be read as a stream (remote shards, ``hf://``), not by index."""
    text = os.fspath(source)
    return text.startswith((HF_STREAM, "pipe:")) or ("://" in text and not text.startswith("file://"))


def _split(spec: str) -> tuple[str, str]:
    base, _, split = spec.partition("@")
    return base, split or "train"


def expand_tar_shards(source: str | os.PathLike) -> list[str]:
    """The shard paths / URLs of a tar source: a folder (its manifest's order, else sorted ``*.tar``), a brace
    pattern (``{000000..000009}``), or one file / URL."""
    text = os.fspath(source).removeprefix("file://")
    path = Path(text)
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.is_file():
            return [str(path / shard["name"]) for shard in read_manifest(path)["shards"]]
        return [str(p) for p in sorted(path.glob("*.tar"))]
    braceexpand = _need("braceexpand").braceexpand
    shards = list(braceexpand(text))
    if not is_streamed(text):
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {text} do not exist (e.g. {missing[0]})")
    return shards


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of a shard folder written by :func:`dinolab.data.shard_writer.write_shards`."""
    return json.loads((Path(folder) / MANIFEST).read_text())


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB (fully decoded here, so a truncated image fails here)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def image_member(sample: dict[str, Any]) -> bytes:
    """The encoded image of a WebDataset sample (its first member with an image extension)."""
    for key, value in sample.items():
        if not key.startswith("__") and key.lstrip(".").lower() in IMAGE_MEMBERS:
            return value.getvalue() if isinstance(value, io.BytesIO) else bytes(value)
    raise ValueError(f"sample {sample.get('__key__')!r} has no image member (one of {', '.join(IMAGE_MEMBERS)})")


# ------------------------------------------------------------------------------------------- indexed sources
class ImageSource:
    """Images addressable by index: ``len``, a stable ``name`` per image and ``load`` (raises on a bad image)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]


class FileImages(ImageSource):
    """Image files (paths kept as one numpy byte array: forked workers do not copy millions of Python objects)."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self._paths = np.array([os.fsencode(p) for p in paths]) if len(paths) else np.zeros(0, dtype="S1")

    def __len__(self) -> int:
        return len(self._paths)

    def name(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.name(index))


class TarImages(ImageSource):
    """Local WebDataset tar shards read by index (``wids.IndexedTarSamples``: the shard's member table is built on
    first access, then members are read from a memory map). Image ``i`` is sample ``i`` in shard order; its name is
    ``SHARD#OFFSET``."""

    def __init__(self, shards: Sequence[str], counts: Sequence[int] | None = None) -> None:
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("no tar shards given")
        self.counts = np.asarray(counts if counts is not None else [self._count(s) for s in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    @classmethod
    def from_source(cls, source: str | os.PathLike) -> TarImages:
        shards = expand_tar_shards(source)
        path = Path(os.fspath(source))
        counts = None
        if path.is_dir() and (path / MANIFEST).is_file():
            counts = [int(shard["count"]) for shard in read_manifest(path)["shards"]]
        return cls(shards, counts)

    @staticmethod
    def _count(shard: str) -> int:
        samples = _indexed_tar(shard)
        try:
            return len(samples)
        finally:
            samples.close()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, offset inside the shard) of image ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} is outside 0..{len(self) - 1}")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, int(index - self.offsets[shard])

    def name(self, index: int) -> str:
        shard, offset = self.locate(index)
        return f"{self.shards[shard]}#{offset}"

    def _samples(self, shard: int) -> Any:
        if self._pid != os.getpid():  # a forked worker must not share the parent's memory maps / file offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        opened = _indexed_tar(self.shards[shard])
        if len(opened) != self.counts[shard]:
            raise ValueError(
                f"{self.shards[shard]} holds {len(opened)} samples, its manifest says {self.counts[shard]}"
            )
        self._open[shard] = opened
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return opened

    def load(self, index: int) -> Image.Image:
        shard, offset = self.locate(index)
        return decode_image(image_member(self._samples(shard)[offset]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}


def _image_column(features: Any, where: str) -> str:
    datasets = _need("datasets")
    columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise ValueError(f"{where} has no image column (features: {list(features)})")
    return columns[0]


def _image_value(value: Any) -> Image.Image:
    """An undecoded ``datasets.Image`` value (``{"bytes", "path"}``) -> RGB."""
    if value.get("bytes") is not None:
        return decode_image(value["bytes"])
    if value.get("path"):
        return load_rgb(value["path"])
    raise ValueError("image value holds neither bytes nor a path")


def load_hf_dataset(spec: str, streaming: bool) -> tuple[Any, str]:
    """The dataset (``datasets.Dataset`` / ``IterableDataset``) of ``hf-disk:`` / ``hf://`` and its image column,
    with images left undecoded (decoded by :func:`decode_image`, so every Pillow mode and bad files are handled as
    for files)."""
    datasets = _need("datasets")
    base, split = _split(spec.removeprefix(HF_DISK).removeprefix(HF_STREAM))
    path = Path(base)
    if not streaming and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset(base, split=split, streaming=streaming)
    column = _image_column(dataset.features, spec)
    return dataset.cast_column(column, datasets.Image(decode=False)), column


class HFImages(ImageSource):
    """A map-style Hugging Face dataset (Arrow on disk); image ``i`` is row ``i``, named ``SPEC#i``."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.dataset, self.column = load_hf_dataset(spec, streaming=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        return f"{self.spec}#{index}"

    def load(self, index: int) -> Image.Image:
        return _image_value(self.dataset[int(index)][self.column])


class ConcatImages(ImageSource):
    """Several sources one after the other."""

    def __init__(self, parts: Sequence[ImageSource]) -> None:
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _find(self, index: int) -> tuple[ImageSource, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part], int(index - self.offsets[part])

    def name(self, index: int) -> str:
        part, inner = self._find(index)
        return part.name(inner)

    def load(self, index: int) -> Image.Image:
        part, inner = self._find(index)
        return part.load(inner)


def open_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> ImageSource:
    """One indexed :class:`ImageSource` over folders / files / ``.txt`` lists, local tar shards and ``hf-disk:``
    datasets (in the order given). Streamed sources raise: read them with :class:`ShardStream`."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    parts: list[ImageSource] = []
    plain: list[str | os.PathLike] = []
    for source in sources:
        if not is_sharded(source):
            plain.append(source)
            continue
        if plain:
            parts.append(FileImages(list_images(plain)))
            plain = []
        if is_streamed(source):
            raise ValueError(f"{source} can only be streamed (remote shards / hf://); it cannot be read by index")
        text = os.fspath(source)
        parts.append(HFImages(text) if text.startswith(HF_DISK) else TarImages.from_source(text))
    if plain:
        parts.append(FileImages(list_images(plain)))
    return parts[0] if len(parts) == 1 else ConcatImages(parts)


def only_files(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> bool:
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    return not any(is_sharded(s) for s in sources)


# -------------------------------------------------------------------------------------------------- streams
@dataclass
class StreamCursor:
    """Where each consumer (rank x DataLoader worker) of a :class:`ShardStream` stands.

    ``next[c] = (slot, offset)``: consumer ``c`` reads sample ``offset`` of the shard in global slot ``slot`` next.
    """

    consumers: int
    next: dict[int, tuple[int, int]] = field(default_factory=dict)

    def start_of(self, consumer: int) -> tuple[int, int]:
        return self.next.get(consumer, (consumer, 0))

    def advance(self, positions: Iterable[int]) -> None:
        """Record delivered samples (their stream positions)."""
        for position in positions:
            if position < 0:
                continue
            slot, offset = divmod(int(position), SHARD_SPAN)
            consumer = slot % self.consumers
            if (slot, offset + 1) > self.start_of(consumer):
                self.next[consumer] = (slot, offset + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"consumers": self.consumers, "next": {str(c): list(v) for c, v in sorted(self.next.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamCursor:
        return cls(int(data["consumers"]), {int(c): (int(v[0]), int(v[1])) for c, v in data["next"].items()})

    def merge(self, other: StreamCursor) -> StreamCursor:
        if other.consumers != self.consumers:
            raise ValueError("cannot merge cursors of streams split differently")
        merged = StreamCursor(self.consumers, dict(self.next))
        for c, position in other.next.items():
            merged.next[c] = max(merged.start_of(c), position)
        return merged

    def resplit(self, consumers: int) -> StreamCursor:
        """The cursor for another number of consumers: every consumer restarts at a shard boundary after the
        first slot some consumer had not finished (no sample is skipped; up to ``self.consumers`` shards may be
        partly read twice)."""
        if consumers == self.consumers:
            return self
        first_open = min(self.start_of(c)[0] for c in range(self.consumers))
        return StreamCursor(consumers, {c: (first_open + c, 0) for c in range(consumers)})


class ShardStream(IterableDataset):
    """The samples of sharded sources as a stream, split across ranks and DataLoader workers (see the module
    docstring), each turned into ``transform`` output wrapped in a :class:`~dinolab.data.datasets.TrainSample`.

    Args:
        sources: tar shard patterns / folders / URLs, ``hf://`` or ``hf-disk:`` datasets (their shards pooled).
        transform: RGB image -> views.
        seed: shard order (pass ``q`` uses ``seed + q``) and per-sample augmentation seeds.
        rank, world_size: this process and the number of processes.
        num_workers: DataLoader workers per process (0: the process reads itself).
        cursor: where to resume (from the checkpoint; ``None`` starts at the beginning).
        batch_offset: batches this process already consumed: the DataLoader fetches batches from its workers in
            turn starting with worker 0, so worker ``w`` reads for consumer ``(w + batch_offset) % num_workers``
            to keep the resumed batch order identical.
    """

    def __init__(
        self,
        sources: Sequence[str],
        transform: Any,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        cursor: StreamCursor | None = None,
        batch_offset: int = 0,
    ) -> None:
        self.shards = [shard for source in sources for shard in _stream_shards(os.fspath(source))]
        if not self.shards:
            raise ValueError(f"no shards found in {list(sources)}")
        self.transform = transform
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        self.consumers = world_size * self.workers
        cursor = cursor or StreamCursor(self.consumers)
        if cursor.consumers != self.consumers:
            log.warning(
                "resuming a data stream read by %d consumers with %d (processes x workers): restarting at a shard "
                "boundary; up to %d partly read shards are read again",
                cursor.consumers,
                self.consumers,
                cursor.consumers,
            )
            cursor = cursor.resplit(self.consumers)
        self.cursor = cursor
        self.batch_offset = batch_offset

    def shard_of_slot(self, slot: int) -> int:
        pass_index, j = divmod(slot, len(self.shards))
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        return int(torch.randperm(len(self.shards), generator=generator)[j])

    def consumer(self) -> int:
        info = get_worker_info()
        worker = ((0 if info is None else info.id) + self.batch_offset) % self.workers
        return self.rank * self.workers + worker

    def __iter__(self) -> Iterator[Any]:
        from dinolab.data.datasets import AUGMENTATION_STREAM, TrainSample, sample_seed

        consumer = self.consumer()
        slot, offset = self.cursor.start_of(consumer)
        skipped: list[tuple[str, str]] = []
        failures = 0
        while True:
            shard = self.shards[self.shard_of_slot(slot)]
            for index, (name, payload) in enumerate(shard.samples()):
                if index < offset:  # resuming mid-shard: earlier samples were delivered before the interruption
                    continue
                position = slot * SHARD_SPAN + index
                try:
                    image = payload()
                except Exception as error:  # corrupt / undecodable sample: skipped and reported, like a bad file
                    message = f"{type(error).__name__}: {error}"
                    log.warning("skipping unreadable sample %s (%s)", name, message)
                    skipped.append((name, message))
                    failures += 1
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        raise RuntimeError(f"{failures} consecutive unreadable samples up to {name}") from error
                    continue
                failures = 0
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, position, AUGMENTATION_STREAM))
                    views = self.transform(image)
                yield TrainSample(views=views, index=index, skipped=skipped, position=position, seed=self.seed)
                skipped = []
            slot, offset = slot + self.consumers, 0


@dataclass
class _StreamShard:
    """One shard of a stream: ``samples()`` yields ``(name, load)`` with ``load()`` decoding the image."""

    kind: str
    location: str
    index: int = 0
    count: int = 1

    def samples(self) -> Iterator[tuple[str, Any]]:
        if self.kind == "tar":
            tariterators = _need("webdataset").tariterators
            for sample in tariterators.tarfile_samples([{"url": self.location}]):
                name = f"{self.location}#{sample['__key__']}"
                yield name, (lambda s=sample: decode_image(image_member(s)))
        else:
            dataset, column = load_hf_dataset(self.location, streaming=self.kind == "hf-stream")
            part = dataset.shard(num_shards=self.count, index=self.index, contiguous=True)
            for row, sample in enumerate(part):
                yield f"{self.location}#shard{self.index}/{row}", (lambda v=sample[column]: _image_value(v))


def _stream_shards(source: str) -> list[_StreamShard]:
    if source.startswith(HF_STREAM):
        dataset, _ = load_hf_dataset(source, streaming=True)
        return [_StreamShard("hf-stream", source, i, dataset.n_shards) for i in range(dataset.n_shards)]
    if source.startswith(HF_DISK):
        # a map-style dataset streamed in contiguous blocks of ~10k rows (one block per "shard")
        dataset, _ = load_hf_dataset(source, streaming=False)
        count = max(1, -(-len(dataset) // 10_000))
        return [_StreamShard("hf-disk", source, i, count) for i in range(count)]
    return [_StreamShard("tar", shard) for shard in expand_tar_shards(source)]


class ImageSourceDataset(torch.utils.data.Dataset):
    """Images ``indices`` (default: all) of an :class:`ImageSource` as
    :class:`~dinolab.data.images.LoadedImage` items (failures reported, not raised), like
    :class:`~dinolab.data.images.ImageFileDataset` for files."""

    def __init__(self, source: ImageSource, transform: Any, indices: Sequence[int] | None = None) -> None:
        self.source = source
        self.transform = transform
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        from dinolab.data.images import LoadedImage

        try:
            return LoadedImage(index, self.transform(self.source.load(int(self.indices[index]))))
        except Exception as error:  # PIL raises many types for bad images; report them all
            return LoadedImage(index, None, f"{type(error).__name__}: {error}")
