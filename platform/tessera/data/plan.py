"""Pure integer plans for the data plane, testable at cluster scale on a laptop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    block: int  # index into the ordered list of blocks
    start: int  # row offsets among that block's rows of the split being written
    stop: int


def plan_shards(block_rows: list[int], samples_per_shard: int) -> list[list[Slice]]:
    """Cut rows spread over ordered blocks into shards of exactly `samples_per_shard` rows (the
    last may be shorter), preserving order. Each shard is the list of block slices it is made of.

    >>> plan_shards([3, 0, 4], 5)
    [[Slice(block=0, start=0, stop=3), Slice(block=2, start=0, stop=2)], [Slice(block=2, start=2, stop=4)]]
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if any(n < 0 for n in block_rows):
        raise ValueError(f"block row counts must be >= 0, got {block_rows}")
    shards: list[list[Slice]] = []
    current: list[Slice] = []
    room = samples_per_shard
    for b, n in enumerate(block_rows):
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Slice(b, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], samples_per_shard
    if current:
        shards.append(current)
    return shards


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"
