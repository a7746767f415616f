"""The work of one recovery method, level by level: what it reads, how it folds a batch into per-shard moments,
how shard moments merge and how a level's layers are solved (:class:`LevelJob`), and the plan of every level
(:class:`LevelPlan`) that :mod:`pipeline.recovery.worker` runs over the shards of a :class:`Sweep`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from pipeline.recovery.sweep import Request, Sweep, request_key


class LevelJob:
    """What one recovery method does with the layers of one level: what it reads per batch (``original`` /
    ``current`` requests), the gather positions it draws before a batch, how it folds a batch into its moments, and
    how it rewrites the layers at the end of the level (subclasses fill these in).

    Moments are kept per shard: :meth:`add` folds a batch into the running part, :meth:`take` hands the part over
    (and starts a new one), :meth:`merge` combines the parts of two shards (the merged prefix first) and
    :meth:`finish` solves from the merge of every shard. Parts must be picklable (Ray workers return them).
    """

    original: tuple[Request, ...] = ()
    current: tuple[Request, ...] = ()

    def indices(self, batch: int, n: int) -> dict[str, np.ndarray]:
        """Index inputs of this job's gathers for batch ``batch`` of ``n`` samples (none by default); the same
        values every time it is asked for one batch."""
        return {}

    def add(self, batch: int, held: bool, original: Mapping[str, np.ndarray],
            current: Mapping[str, np.ndarray]) -> None:
        """Fold one batch (values by request key: the tensor name, or the gather's output name)."""
        raise NotImplementedError

    def take(self) -> Any:
        """The moments folded since the last call (one shard's part), and a fresh start."""
        return None

    def merge(self, total: Any, part: Any) -> Any:
        """The moments of ``total``'s shards and then ``part``'s."""
        return merge_parts(total, part)

    def finish(self, moments: Any) -> tuple[list[Any], list[tuple[str, str]]]:
        """Rewrite the level's layers from the moments of every shard; return what was done per layer and the
        layers skipped with a reason."""
        raise NotImplementedError


def merge_parts(total: Any, part: Any) -> Any:
    """Merge per-name ``(fit, held-out)`` moment pairs (None: no rows), ``total`` first."""
    if total is None or part is None:
        return part if total is None else total

    def one(a: Any, b: Any) -> Any:
        return b if a is None else a if b is None else a.merge(b)

    return {name: tuple(one(a, b) for a, b in zip(total[name], part[name], strict=True)) for name in total}


@dataclass(frozen=True)
class LevelPlan:
    """A recovery method's work: node index -> level of every layer it rewrites, the jobs of every level (in
    level order) and the layers it skips up front with a reason."""

    levels: Mapping[int, int]
    jobs: Mapping[int, Sequence[LevelJob]]
    skipped: Sequence[tuple[str, str]]
    sequential: bool

    def requests(self) -> dict[int, tuple[tuple[Request, ...], tuple[Request, ...]]]:
        """Level -> (requests to the original, requests to the current model) of its jobs."""
        return {k: (tuple(dict.fromkeys(r for j in js for r in j.original)),
                    tuple(dict.fromkeys(r for j in js for r in j.current))) for k, js in self.jobs.items()}

    def sweep(self, original: onnx.ModelProto, current: onnx.ModelProto, dataset: Any, **session: Any) -> Sweep:
        """A :class:`Sweep` for these jobs."""
        return Sweep(original, current, self.levels, self.requests(), dataset, sequential=self.sequential,
                     **session)

    def indices(self, wanted: Iterable[int], batch: int, n: int) -> dict[str, np.ndarray]:
        """The gather positions of the jobs of levels ``wanted`` for one batch."""
        return {name: value for level in wanted for job in self.jobs[level]
                for name, value in job.indices(batch, n).items()}

    def fold(self, sweep: Sweep, level: int, batches: Iterable[int]) -> None:
        """Run ``level``'s step for ``batches`` and fold them into the level's jobs."""
        keys_o, keys_c = ([request_key(r) for r in side] for side in self.requests()[level])
        for batch, held, outs, curs in sweep.run(level, batches, self.indices):
            by_o, by_c = dict(zip(keys_o, outs, strict=True)), dict(zip(keys_c, curs, strict=True))
            start = time.perf_counter()
            for job in self.jobs[level]:
                job.add(batch, held, by_o, by_c)
            sweep.seconds["fold"] += time.perf_counter() - start
