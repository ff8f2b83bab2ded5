"""An infinite, sharded, resumable stream of dataset indices for pretraining.

The *global stream* is the concatenation of passes over the dataset: pass ``q`` is a permutation of
``range(size)`` drawn by ``torch.randperm`` from a generator seeded with ``seed + q`` (the identity when
``shuffle=False``). Position ``p`` of the global stream is therefore ``perm_{p // size}[p % size]``, which can be
computed without generating earlier passes: resuming costs one permutation, however far the run got.

With ``world_size`` processes, rank ``r`` takes positions ``g0 + r, g0 + r + W, g0 + r + 2W, ...`` where ``g0`` is
the number of global samples consumed before this stream starts. Ranks never overlap and together cover every
position from ``g0`` on.

Resuming:
    * same number of processes: ``InfiniteSampler(..., start=step * batch_size_per_rank)`` (``start`` counts the
      samples THIS rank already consumed; ``g0 = start * world_size``). Each rank then sees exactly the tail of the
      stream it would have seen without the interruption.
    * another number of processes: ``InfiniteSampler.from_global_position(step * global_batch_size, rank,
      new_world_size, ...)``. The global stream continues from the same position, so no image is skipped or seen
      twice, but which rank/batch an image lands in changes (unavoidable when the batch is split differently).

Every index the sampler yields is a :class:`StreamIndex`: an ``int`` (usable with any dataset) that also carries its
global stream position and the sampler's seed, from which :class:`~dinolab.data.datasets.UnlabeledImageDataset`
seeds the augmentation of that sample and the collate seeds the masks of that batch. A resumed run thus sees
identical crops and masks, not just identical images.

Permutations come from ``torch.randperm``; a different torch version may draw different permutations for the same
seed (the stream stays valid, only not identical to a run made with another version).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_CHUNK = 1 << 16  # indices converted to Python ints at a time (a pass can hold hundreds of millions)


class StreamIndex(int):
    """A dataset index that remembers where it sits in the global stream (``position``) and the stream's ``seed``."""

    position: int
    seed: int

    def __new__(cls, index: int, position: int, seed: int) -> StreamIndex:
        value = super().__new__(cls, index)
        value.position = position
        value.seed = seed
        return value

    def __getnewargs__(self) -> tuple[int, int, int]:  # type: ignore[override]
        # pickling (indices travel to DataLoader workers through a queue) must keep position and seed
        return int(self), self.position, self.seed

    def __repr__(self) -> str:
        return f"StreamIndex({int(self)}, position={self.position}, seed={self.seed})"


class InfiniteSampler(Sampler[int]):
    """Infinite stream of indices into a dataset of ``size`` items, for rank ``rank`` of ``world_size``.

    Args:
        size: number of items of the dataset.
        seed: seed of the permutations (pass ``q`` uses ``seed + q``) and of the per-sample augmentation seeds.
        rank, world_size: this process and the number of processes sharing the stream.
        shuffle: a new random permutation per pass (else ``0, 1, ..., size-1`` repeated).
        start: samples this rank has already consumed (to resume with the same ``world_size``).
    """

    def __init__(
        self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, start: int = 0
    ) -> None:
        if size < 1:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got size={size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0:
            raise ValueError(f"start (samples already consumed by this rank) must be >= 0, got {start}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.global_start = start * world_size
        """Global samples consumed before this stream (``g0``): the first position is ``global_start + rank``."""

    @classmethod
    def from_global_position(
        cls, global_samples_consumed: int, rank: int, world_size: int, size: int, seed: int = 0, shuffle: bool = True
    ) -> InfiniteSampler:
        """Continue the global stream after ``global_samples_consumed`` samples (all ranks together, e.g.
        ``step * batch_size_per_rank * old_world_size``), with any number of processes."""
        if global_samples_consumed < 0:
            raise ValueError(f"global_samples_consumed must be >= 0, got {global_samples_consumed}")
        sampler = cls(size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle)
        sampler.global_start = global_samples_consumed
        return sampler

    def permutation(self, pass_index: int) -> torch.Tensor:
        """The dataset order of pass ``pass_index`` of the global stream: ``[size]`` int64 indices."""
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[StreamIndex]:
        position = self.global_start + self.rank
        while True:
            pass_index, offset = divmod(position, self.size)
            # this rank's share of the pass: every world_size-th entry from `offset` (copied so the full
            # permutation can be freed while the pass is being consumed)
            share = self.permutation(pass_index)[offset :: self.world_size].clone()
            for chunk_start in range(0, len(share), _CHUNK):
                for k, index in enumerate(share[chunk_start : chunk_start + _CHUNK].tolist(), start=chunk_start):
                    yield StreamIndex(index, position + k * self.world_size, self.seed)
            position += len(share) * self.world_size

    def __repr__(self) -> str:
        return (
            f"InfiniteSampler(size={self.size}, seed={self.seed}, rank={self.rank}, world_size={self.world_size}, "
            f"shuffle={self.shuffle}, global_start={self.global_start})"
        )
