"""Deterministic shares of the work: one function for torchrun's ranks and for ``--shard I/N``.

A run's inputs are cut into *units* (a tar shard, or a block of consecutive files; see
``pipeline.number_blocks``) and every unit goes to exactly one of ``count`` shares. The split is a
pure function of the list of units and their sizes, so independent processes that list the same
inputs (SLURM array tasks, Kubernetes indexed jobs, torchrun's ranks) agree on it without talking
to each other, and together they cover every input exactly once.

Balance: each unit weighs its bytes plus ``FILE_COST`` per file (a small file still costs a model
call); units go, heaviest first, to the share with the least weight so far (ties: the one with
fewer units, then the lower index). This is the longest-processing-time greedy rule: the heaviest
share exceeds the average by at most the weight of one unit.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass

from vqcli.errors import UsageError

FILE_COST = 16 * 1024  # bytes: what one file weighs beyond its size (opening it, one model call)


@dataclass(frozen=True)
class Share:
    """Share ``index`` (from 0) of ``count`` and, inside it, part ``rank`` of ``world`` (torchrun's
    ranks of the job that runs that share): the share's inputs are chosen from the split into
    ``count`` alone, then split among the ranks, so what a share covers does not depend on how
    many processes run it."""

    index: int
    count: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"share {self.index} of {self.count} does not exist")
        if not (self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"rank {self.rank} of {self.world} does not exist")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}" + (f" (rank {self.rank} of {self.world})" if self.world > 1 else "")


def parse_shard(text: str) -> Share:
    """``"I/N"`` (0 <= I < N) to a ``Share``; anything else is a ``UsageError``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--shard {text!r}: use I/N, e.g. 0/4 for the first of four shards")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text!r}: I must be 0 to N-1 (shards are counted from 0)")
    return Share(index, count)


def combine(outer: Share | None, rank: int, world: int) -> Share | None:
    """The share of one rank of a torchrun job that itself runs shard ``outer`` (or everything).

    Rank ``r`` of ``W`` inside shard ``I/N`` takes part ``r`` of ``W`` of exactly what shard ``I``
    of ``N`` takes (``select``), so shards run with different numbers of ranks still fit together.
    ``None`` when there is one process and no shard (the whole input, streamed as it is found).
    """
    if world == 1:
        return outer
    outer = outer or Share(0, 1)
    return Share(outer.index, outer.count, rank, world)


def select(weights: Sequence[int], share: Share) -> list[bool]:
    """For each unit, whether ``share`` (its shard, then its rank in it) takes it."""
    owner = assign(weights, share.count)
    units = [u for u, s in enumerate(owner) if s == share.index]
    mine = [False] * len(weights)
    for u, rank in zip(units, assign([weights[u] for u in units], share.world)):
        mine[u] = rank == share.rank
    return mine


def assign(weights: Sequence[int], count: int) -> list[int]:
    """The share (0..count-1) of each unit, from the units' weights; deterministic."""
    if count < 1:
        raise ValueError("count must be at least 1")
    shares = [0] * len(weights)
    if count == 1:
        return shares
    # Only the first min(count, units) shares can ever be chosen (an untouched share always wins
    # over a loaded one, the lower index first), so a count of 10**20 costs nothing.
    heap = [(0, 0, s) for s in range(min(count, len(weights)))]  # (weight so far, units so far, share)
    for unit in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, units, share = heapq.heappop(heap)
        shares[unit] = share
        heapq.heappush(heap, (load + weights[unit], units + 1, share))
    return shares


def unit_weight(sizes: Sequence[int]) -> int:
    """What a unit of files with these sizes (bytes; negative: unknown, taken as 0) weighs."""
    return sum(max(size, 0) + FILE_COST for size in sizes)
