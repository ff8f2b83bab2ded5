"""Unlabelled images for self-supervised pretraining, robust to unreadable files.

Any image folder (recursive), an ImageFolder tree (its class folders are just sub-folders: labels are ignored) or a
``.txt`` list of paths works as a source. An unreadable or corrupt file does not stop training: the dataset logs a
warning, moves on to the next index and reports the file in the sample it returns, so that the training loop (in
the main process, while items are built in worker processes) can count the skipped files.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dinolab.data.images import IMAGE_EXTENSIONS
from dinolab.data.shards import open_images

logger = logging.getLogger(__name__)


@dataclass
class TrainSample:
    """One item of :class:`UnlabeledImageDataset`."""

    views: Any
    """What the transform returned (a :class:`~dinolab.data.augmentation.MultiCropViews` for pretraining)."""
    index: int
    """Dataset index of the image the views come from (differs from the requested one after a skip)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, error) of the unreadable files met while producing this sample."""
    position: int | None = None
    """Position of the requested index in the sampler's global stream (None for a plain int index)."""
    seed: int | None = None
    """Seed of that stream (None for a plain int index)."""


def sample_seed(seed: int, position: int, stream: int) -> int:
    """A 64-bit seed for sample ``position`` of a run seeded ``seed``; ``stream`` separates uses (crops, masks)."""
    return int(np.random.SeedSequence([seed, position, stream]).generate_state(1, dtype=np.uint64)[0])


AUGMENTATION_STREAM = 0  # `stream` of sample_seed for the crops of a sample (masks use 1, loader generators 2)


class UnlabeledImageDataset(Dataset):
    """Images from folders / ImageFolder trees / ``.txt`` path lists / tar shards / ``hf-disk:`` datasets (see
    :mod:`dinolab.data.shards`), each turned into views by ``transform``.

    Args:
        sources: one source or several (folders are searched recursively for ``IMAGE_EXTENSIONS``).
        transform: PIL RGB image -> views (e.g. :class:`~dinolab.data.augmentation.MultiCropAugmentation`).
        max_retries: how many following indices to try after an unreadable file before giving up with an error.

    ``dataset[i]`` returns a :class:`TrainSample`. When ``i`` is a
    :class:`~dinolab.data.samplers.StreamIndex` (what :class:`~dinolab.data.samplers.InfiniteSampler` yields),
    torch's RNG is seeded from (stream seed, stream position) for the transform, so the crops of a sample do not
    depend on which worker builds it or on whether the run was resumed; the global RNG state is restored after.
    """

    def __init__(
        self,
        sources: str | os.PathLike | Iterable[str | os.PathLike],
        transform: Callable[[Image.Image], Any],
        max_retries: int = 10,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        # FileImages keeps paths as one numpy byte array: forked DataLoader workers would otherwise copy the pages
        # of millions of refcounted Path objects as they touch them
        self.images = open_images(sources)
        if not len(self.images):
            raise ValueError(
                f"no images found in {sources!r}: give folders holding image files "
                f"({', '.join(IMAGE_EXTENSIONS)}), .txt files listing image paths, tar shards or hf-disk: datasets"
            )
        self.transform = transform
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.images)

    def path(self, index: int) -> Path:
        """Path of image ``index`` (``SHARD#OFFSET`` / ``hf-disk:…#ROW`` for sharded sources)."""
        return Path(self.images.name(index))

    @property
    def paths(self) -> list[Path]:
        return [self.path(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> TrainSample:
        position, seed = getattr(index, "position", None), getattr(index, "seed", None)
        skipped: list[tuple[str, str]] = []
        for attempt in range(min(self.max_retries, len(self) - 1) + 1):
            current = (int(index) + attempt) % len(self)
            path = self.images.name(current)
            try:
                image = self.images.load(current)
            except Exception as error:  # PIL raises many exception types for bad files; skip them all
                message = f"{type(error).__name__}: {error}"
                logger.warning("skipping unreadable image %s (%s)", path, message)
                skipped.append((path, message))
                continue
            views = self._transform(image, position, seed)
            return TrainSample(views=views, index=current, skipped=skipped, position=position, seed=seed)
        listed = "\n  ".join(f"{p}: {e}" for p, e in skipped)
        raise RuntimeError(
            f"could not read any of {len(skipped)} consecutive images from index {int(index)} "
            f"(max_retries={self.max_retries}); check these files:\n  {listed}"
        )

    def _transform(self, image: Image.Image, position: int | None, seed: int | None) -> Any:
        if position is None or seed is None:
            return self.transform(image)
        # torchvision transforms draw from torch's global RNG: seed it for this sample only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(seed, position, AUGMENTATION_STREAM))
            return self.transform(image)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's and numpy's global RNGs from the seed torch gave this worker.

    The DataLoader seeds torch in each worker with ``base_seed + worker_id``, ``base_seed`` drawn from the loader's
    generator; the other RNGs would otherwise be copies of the parent's (identical in every worker under fork).
    """
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def make_pretraining_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | None,
    collate: Callable[[list], Any],
    num_workers: int,
    seed: int,
    rank: int = 0,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    persistent_workers: bool | None = None,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A DataLoader of ``batch_size``-image batches (incomplete batches dropped) over an infinite ``sampler``
    (``None`` for an iterable dataset such as :class:`~dinolab.data.shards.ShardStream`, whose workers each batch
    their own share of the stream).

    Reproducibility: the images and their order come from the sampler alone. With
    :class:`~dinolab.data.samplers.InfiniteSampler` every index carries its stream position, from which the dataset
    seeds each sample's crops and :class:`~dinolab.data.collate.MultiCropCollate` each batch's masks, so a resumed
    run (same seed, ``start`` from the step) sees identical batches whatever the worker count. Whatever else draws
    random numbers in the workers is seeded from ``(seed, rank, worker id)`` through the loader's generator and
    :func:`seed_worker`.

    ``pin_memory=None`` pins when CUDA is available; ``persistent_workers=None`` keeps workers alive when there are
    any (an infinite loader is iterated once, but this also avoids a restart per ``iter()``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(sample_seed(seed, rank, stream=2))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=True,
        worker_init_fn=seed_worker,
        generator=generator,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=(num_workers > 0) if persistent_workers is None else persistent_workers,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
    )
