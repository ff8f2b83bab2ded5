"""The pretraining input pipeline of a run: dataset -> multi-crop views -> masks -> batches, resumable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from dinolab.data import (
    Batch,
    InfiniteSampler,
    MaskingGenerator,
    MultiCropAugmentation,
    MultiCropCollate,
    UnlabeledImageDataset,
    make_pretraining_loader,
)
from dinolab.data.images import format_path_line
from dinolab.data.shards import ShardStream, StreamCursor, is_sharded, is_streamed
from dinolab.runtime import dedup_lines
from dinolab.train.config import TrainConfig
from dinolab.train.distributed import DistEnv


@dataclass
class TrainingData:
    """An endless iterator of batches, and a record of the unreadable files met on the way."""

    loader: DataLoader
    batches: Iterator[Batch]
    skipped_log: Path | None
    num_images: int
    """Images of an indexed dataset (-1 for a stream)."""
    skipped_total: int = 0
    """Unreadable files met so far by this process."""
    cursor: StreamCursor | None = None
    """Where each consumer of a streamed dataset stands (None for indexed data, whose position is the step)."""

    def next_batches(self, count: int, device: torch.device) -> Iterator[Batch]:
        """The next ``count`` batches on ``device`` (lazily: one micro-batch in memory at a time)."""
        for _ in range(count):
            batch = next(self.batches)
            self.skipped_total += self.record_skipped(batch.skipped)
            if self.cursor is not None and batch.positions is not None:
                self.cursor.advance(batch.positions.tolist())
            yield batch.to(device, non_blocking=True)

    def stream_state(self) -> dict | None:
        """All processes' stream cursors merged (a collective under torchrun: every process calls it), for the
        checkpoint; None for indexed data."""
        if self.cursor is None:
            return None
        cursor = self.cursor
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, cursor.to_dict())
            for other in gathered:
                cursor = cursor.merge(StreamCursor.from_dict(other))
        return cursor.to_dict()

    def record_skipped(self, skipped: list[tuple[str, str]]) -> int:
        """Append unreadable files to ``skipped_images.txt`` (one per process) unless already listed there (a resumed
        run meets them again); returns how many there were."""
        if skipped and self.skipped_log is not None:
            lines = [f"{format_path_line(path)}\t{' '.join(error.split())}" for path, error in skipped]
            fresh = dedup_lines(self.skipped_log, lines)
            if fresh:
                with self.skipped_log.open("a", encoding="utf-8") as f:
                    f.writelines(line + "\n" for line in fresh)
        return len(skipped)

    def close(self) -> None:
        # ends the DataLoader's worker processes
        self.batches = iter(())
        del self.loader


def uses_stream(sources: list[str], mode: str) -> bool:
    """Whether ``run.data`` is read as a shard stream (``run.data_mode``: ``auto`` streams only what cannot be read
    by index: remote shards and ``hf://``; ``stream`` streams local shards too; ``indexed`` never streams)."""
    if mode not in ("auto", "indexed", "stream"):
        raise ValueError(f"run.data_mode must be 'auto', 'indexed' or 'stream', got {mode!r}")
    streamed = [s for s in sources if is_streamed(s)]
    if mode == "indexed" and streamed:
        raise ValueError(f"run.data_mode='indexed' but {streamed[0]} can only be streamed")
    if mode == "stream" and not all(is_sharded(s) for s in sources):
        raise ValueError("run.data_mode='stream' reads tar shards and datasets only; convert folders: dinolab shards")
    return mode == "stream" or bool(streamed)


def build_training_data(
    config: TrainConfig, env: DistEnv, start_sample: int = 0, stream_state: dict | None = None
) -> TrainingData:
    """Batches for this process, continuing the global sample stream after ``start_sample`` samples (indexed data)
    or from ``stream_state`` (the checkpoint's stream cursor, for streamed data)."""
    if not config.run.data:
        raise ValueError("run.data is empty: give image folders, ImageFolder trees, .txt path lists or shards")
    augmentation = MultiCropAugmentation(config.crops)
    if uses_stream(list(config.run.data), getattr(config.run, "data_mode", "auto")):
        per_process = config.optim.batch_size_per_process
        stream = ShardStream(
            config.run.data,
            augmentation,
            seed=config.run.seed,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=config.run.num_workers,
            cursor=StreamCursor.from_dict(stream_state) if stream_state else None,
            batch_offset=start_sample // (per_process * env.world_size),
        )
        data = _loader(config, env, stream, None)
        data.cursor = stream.cursor
        return data
    dataset = UnlabeledImageDataset(config.run.data, augmentation)
    sampler = InfiniteSampler.from_global_position(
        start_sample, rank=env.rank, world_size=env.world_size, size=len(dataset), seed=config.run.seed
    )
    return _loader(config, env, dataset, sampler)


def _loader(config: TrainConfig, env: DistEnv, dataset: Dataset, sampler: InfiniteSampler | None) -> TrainingData:
    grid = config.crops.global_size // config.model.patch_size
    masking = config.masking
    collate = MultiCropCollate(
        MaskingGenerator((grid, grid), min_num_patches=masking.min_num_patches),
        mask_ratio_min_max=masking.ratio_min_max,
        # switching iBOT off switches masking off: the student then sees the same clean views as the teacher
        mask_sample_probability=masking.sample_probability if config.loss.ibot_weight > 0 else 0.0,
    )
    loader = make_pretraining_loader(
        dataset,
        batch_size=config.optim.batch_size_per_process,
        sampler=sampler,
        collate=collate,
        num_workers=config.run.num_workers,
        seed=config.run.seed,
        rank=env.rank,
    )
    suffix = f".rank{env.rank}" if env.distributed else ""
    run_dir = Path(config.run.output_dir)
    skipped_log = run_dir / f"skipped_images{suffix}.txt" if run_dir.is_dir() else None
    num_images = len(dataset) if sampler is not None else -1  # a stream's size is not known up front
    return TrainingData(loader=loader, batches=iter(loader), skipped_log=skipped_log, num_images=num_images)
