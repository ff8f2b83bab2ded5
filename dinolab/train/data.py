"""The pretraining input pipeline of a run: dataset -> multi-crop views -> masks -> batches, resumable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dinolab.data import (
    Batch,
    InfiniteSampler,
    MaskingGenerator,
    MultiCropAugmentation,
    MultiCropCollate,
    UnlabeledImageDataset,
    make_pretraining_loader,
)
from dinolab.train.config import TrainConfig
from dinolab.train.distributed import DistEnv


@dataclass
class TrainingData:
    """An endless iterator of batches, and a record of the unreadable files met on the way."""

    loader: DataLoader
    batches: Iterator[Batch]
    skipped_log: Path | None
    num_images: int
    skipped_total: int = 0
    """Unreadable files met so far by this process."""

    def next_batches(self, count: int, device: torch.device) -> Iterator[Batch]:
        """The next ``count`` batches on ``device`` (lazily: one micro-batch in memory at a time)."""
        for _ in range(count):
            batch = next(self.batches)
            self.skipped_total += self.record_skipped(batch.skipped)
            yield batch.to(device, non_blocking=True)

    def record_skipped(self, skipped: list[tuple[str, str]]) -> int:
        """Append unreadable files to ``skipped_images.txt`` (one per process); returns how many there were."""
        if skipped and self.skipped_log is not None:
            with self.skipped_log.open("a") as f:
                f.writelines(f"{path}\t{error}\n" for path, error in skipped)
        return len(skipped)

    def close(self) -> None:
        # ends the DataLoader's worker processes
        self.batches = iter(())
        del self.loader


def build_training_data(config: TrainConfig, env: DistEnv, start_sample: int = 0) -> TrainingData:
    """Batches for this process, continuing the global sample stream after ``start_sample`` samples."""
    if not config.run.data:
        raise ValueError("run.data is empty: give image folders, ImageFolder trees or .txt path lists")
    dataset = UnlabeledImageDataset(config.run.data, MultiCropAugmentation(config.crops))
    sampler = InfiniteSampler.from_global_position(
        start_sample, rank=env.rank, world_size=env.world_size, size=len(dataset), seed=config.run.seed
    )
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
    return TrainingData(loader=loader, batches=iter(loader), skipped_log=skipped_log, num_images=len(dataset))
