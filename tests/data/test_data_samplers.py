"""The infinite sampler against the stream it promises: pass q = randperm(size) seeded seed + q, rank r takes
positions r, r + W, ... of it."""

from __future__ import annotations

import itertools
import pickle
import time

import pytest
import torch

from dinolab.data import InfiniteSampler, StreamIndex

SIZE, SEED = 10, 3


def reference_stream(num_positions: int, size: int = SIZE, seed: int = SEED, shuffle: bool = True) -> list[int]:
    """The global stream written out naively: concatenated permutations, one per pass."""
    stream: list[int] = []
    for pass_index in itertools.count():
        if len(stream) >= num_positions:
            return stream[:num_positions]
        g = torch.Generator().manual_seed(seed + pass_index)
        stream += torch.randperm(size, generator=g).tolist() if shuffle else list(range(size))
    raise AssertionError


def take(sampler: InfiniteSampler, n: int) -> list[StreamIndex]:
    return list(itertools.islice(sampler, n))


def test_single_rank_is_the_reference_stream() -> None:
    got = take(InfiniteSampler(SIZE, seed=SEED), 35)
    assert [int(i) for i in got] == reference_stream(35)
    assert [i.position for i in got] == list(range(35)) and {i.seed for i in got} == {SEED}
    assert got[:SIZE] != got[SIZE : 2 * SIZE], "each pass has its own permutation"
    assert sorted(got[:SIZE]) == list(range(SIZE))
    assert take(InfiniteSampler(SIZE, seed=SEED), 35) == got, "deterministic"


def test_no_shuffle_repeats_range() -> None:
    assert take(InfiniteSampler(4, shuffle=False), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_shard_the_stream_without_overlap(world_size: int) -> None:
    per_rank = 12
    stream = reference_stream(per_rank * world_size)
    ranks = [take(InfiniteSampler(SIZE, seed=SEED, rank=r, world_size=world_size), per_rank) for r in range(world_size)]
    for r, got in enumerate(ranks):
        assert [int(i) for i in got] == stream[r::world_size]
        assert [i.position for i in got] == list(range(r, per_rank * world_size, world_size))
    positions = sorted(i.position for got in ranks for i in got)
    assert positions == list(range(per_rank * world_size)), "disjoint and covering"
    # within the first pass, the ranks together see every image exactly once
    first_pass = sorted(int(i) for got in ranks for i in got if i.position < SIZE)
    assert first_pass == list(range(SIZE))


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_gives_the_tail_of_the_uninterrupted_stream(world_size: int) -> None:
    for rank in range(world_size):
        full = take(InfiniteSampler(SIZE, seed=SEED, rank=rank, world_size=world_size), 40)
        for start in (0, 7, 13, 25):
            resumed = take(InfiniteSampler(SIZE, seed=SEED, rank=rank, world_size=world_size, start=start), 40 - start)
            assert resumed == full[start:]
            assert [i.position for i in resumed] == [i.position for i in full[start:]]


def test_world_size_change_continues_the_global_stream() -> None:
    old_world, batch_per_rank, steps = 2, 3, 5
    consumed = steps * batch_per_rank * old_world  # 30 global samples
    new_world = 3
    resumed = [
        take(InfiniteSampler.from_global_position(consumed, r, new_world, size=SIZE, seed=SEED), 8)
        for r in range(new_world)
    ]
    stream = reference_stream(consumed + 8 * new_world)
    for r, got in enumerate(resumed):
        assert [int(i) for i in got] == stream[consumed + r :: new_world]
    assert sorted(i.position for got in resumed for i in got) == list(range(consumed, consumed + 8 * new_world))
    # with the same world size, from_global_position is the same as start = consumed / world_size
    same = InfiniteSampler.from_global_position(consumed, 1, old_world, size=SIZE, seed=SEED)
    assert take(same, 9) == take(InfiniteSampler(SIZE, seed=SEED, rank=1, world_size=old_world, start=15), 9)


def test_skipping_ahead_is_constant_time() -> None:
    size, start = 1000, 10**12  # a trillion samples into the run
    tic = time.perf_counter()
    got = take(InfiniteSampler(size, seed=SEED, rank=1, world_size=2, start=start), 3)
    assert time.perf_counter() - tic < 2.0
    position = start * 2 + 1
    pass_index, offset = divmod(position, size)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(SEED + pass_index)).tolist()
    assert [int(i) for i in got] == perm[offset : offset + 6 : 2]
    assert got[0].position == position


def test_stream_index_is_an_int_that_survives_pickling() -> None:
    index = StreamIndex(3, position=17, seed=5)
    copy = pickle.loads(pickle.dumps(index))
    assert copy == 3 and copy.position == 17 and copy.seed == 5 and isinstance(copy, int)
    assert list(range(10))[copy] == 3


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        InfiniteSampler(0)
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start"):
        InfiniteSampler(10, start=-1)
