"""Deterministic shards of a dataset, and the fixed order in which their statistics are merged.

Calibration and recovery reduce data to sums (class counts, per-class sums and Gram matrices; recovery's moments
``G``, ``H``). Floating-point addition is not associative, so the order of the additions is part of the result. One
order is fixed here, the same whether one process or a Ray cluster of any size does the work:

* the samples are cut into consecutive batches of ``batch_size`` (batch ``i`` covers samples
  ``[i * batch_size, (i + 1) * batch_size)``), and the batches into consecutive *shards* of ``shard_batches``
  batches (:func:`shard_layout`); the layout depends on the data, the batch size and the shard size only, never on
  the number of workers;
* inside a shard, batches are folded in order into the shard's own sums;
* shard sums are merged left to right in shard order (:class:`OrderedMerge`): ``((S0 + S1) + S2) + ...``.

So statistics from 1, 2 or 3 workers are equal to the last bit, and equal to those of a run without Ray; they change
(in the last bits) only with the shard size. Which worker computes a shard (:func:`assign`) does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeline.errors import UserInputError

SHARD_BATCHES = 4
"""Default shard size in batches (256 samples at the default batch size of 64): small enough that 1,000 images give
4 shards to spread over workers, large enough that the per-shard sums a worker returns stay few."""

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """One shard: its position in the merge order, its samples ``[start, stop)`` and its batches ``[first, last)``."""

    index: int
    start: int
    stop: int
    first_batch: int
    stop_batch: int

    @property
    def batches(self) -> range:
        """Global indices of the shard's batches."""
        return range(self.first_batch, self.stop_batch)


def shard_layout(num_samples: int, batch_size: int, shard_batches: int = SHARD_BATCHES) -> tuple[Shard, ...]:
    """The shards of ``num_samples`` samples (see the module docstring); the last shard may be shorter."""
    if batch_size < 1 or shard_batches < 1:
        raise UserInputError(f"batch size and shard size must be positive, got {batch_size} and {shard_batches}")
    per_shard = batch_size * shard_batches
    total_batches = -(-num_samples // batch_size)
    shards = []
    for index, start in enumerate(range(0, num_samples, per_shard)):
        first = index * shard_batches
        shards.append(Shard(index, start, min(start + per_shard, num_samples), first,
                            min(first + shard_batches, total_batches)))
    return tuple(shards)


def batch_range(batch: int, batch_size: int, num_samples: int) -> tuple[int, int]:
    """Samples ``[start, stop)`` of global batch ``batch``."""
    start = batch * batch_size
    return start, min(start + batch_size, num_samples)


def assign(shards: Sequence[Shard], workers: int) -> list[list[Shard]]:
    """Shards dealt round robin to ``min(workers, len(shards))`` workers (worker ``w`` gets shards ``w, w + W, ...``),
    so that the workers finish the shards roughly in merge order."""
    count = max(1, min(workers, len(shards)))
    return [list(shards[w::count]) for w in range(count)]


class OrderedMerge(Generic[T]):
    """Left-to-right merge of per-shard values that may arrive in any order: a value is folded as soon as every
    shard before it was folded; the others wait (at most the shards in flight)."""

    def __init__(self, merge: Callable[[T, T], T]) -> None:
        """``merge(total, part)`` combines the merged prefix with the next shard's value."""
        self.merge, self.next, self.total = merge, 0, None
        self.waiting: dict[int, T] = {}

    def add(self, index: int, value: T) -> None:
        """Take shard ``index``'s value."""
        self.waiting[index] = value
        while self.next in self.waiting:
            part = self.waiting.pop(self.next)
            self.total = part if self.total is None else self.merge(self.total, part)
            self.next += 1

    def result(self, count: int) -> T:
        """The merge of shards ``0 .. count - 1`` (all must have arrived)."""
        assert self.next == count and not self.waiting and self.total is not None, (self.next, count)
        return self.total


def in_order(values: Iterator[tuple[int, T]], merge: Callable[[T, T], T], count: int) -> T:
    """Merge ``(shard index, value)`` pairs (any arrival order) left to right in shard order."""
    merged: OrderedMerge[T] = OrderedMerge(merge)
    for index, value in values:
        merged.add(index, value)
    return merged.result(count)
