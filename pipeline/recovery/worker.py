"""Who computes recovery's sweep, shard by shard: a :class:`SweepWorker` in this process or on Ray workers.

The driver (:func:`sweep_levels`) owns the pruned model and the jobs of every level (:class:`LevelPlan`). For each
level it asks for every shard's moments (:mod:`pipeline.data.shards`: fixed shards of consecutive batches), merges them
in shard order, solves (:meth:`LevelJob.finish` writes the level's layers into the pruned model) and hands the new
weights (:class:`LayerUpdate`) to the workers before the next level. A :class:`SweepWorker` holds some shards: its
own :class:`Sweep` (frontier) over them, its own copy of the pruned model (the driver's, in this process) and its
own jobs, of which it uses only the position draws and the folding.

Replay: a worker keeps, per shard, the last step it ran. Asked for level ``k`` of a shard that is behind (a Ray
actor restarted after its process died starts with nothing), it first applies every update it has not seen and runs
the missing steps for that shard without folding. The nodes of step ``s`` involve only layers of levels below
``s``, whose weights are final once their level is solved, so the replayed frontier is the one the lost worker had,
and the moments it returns are the same: a worker lost mid-run does not change the result.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graph_ops.errors import PreconditionError
from graph_ops.proto import layer_weights, write_weights
from pipeline.data.shards import OrderedMerge, Shard
from pipeline.errors import CalibrationError
from pipeline.recovery.levels import LevelPlan

Planner = Callable[[onnx.ModelProto, onnx.ModelProto], LevelPlan]
"""``(original, pruned) -> LevelPlan``: a recovery method bound to its index, plan and options (picklable)."""


@dataclass(frozen=True)
class LayerUpdate:
    """The weights one level wrote: ``(node index, weight, bias or None)`` per layer of the level."""

    layers: tuple[tuple[int, np.ndarray, np.ndarray | None], ...]

    @classmethod
    def of(cls, model: onnx.ModelProto, plan: LevelPlan, level: int) -> LayerUpdate:
        """The current weights of ``level``'s layers in ``model`` (layers without initializer weights are left
        out: no job could write them)."""
        layers = []
        for idx, lvl in sorted(plan.levels.items()):
            if lvl != level:
                continue
            try:
                weight, bias = layer_weights(model, model.graph.node[idx])
            except PreconditionError:
                continue
            layers.append((idx, weight, bias))
        return cls(tuple(layers))

    def apply(self, model: onnx.ModelProto) -> None:
        """Write the weights into ``model`` (in place)."""
        for idx, weight, bias in self.layers:
            write_weights(model, idx, weight, bias)


class SweepWorker:
    """Some shards of a recovery sweep (see the module docstring).

    Args:
        original: the unpruned (canonical) model.
        current: the pruned model this worker advances (the driver's own model in this process, a copy on Ray).
        plan: the recovery method's plan for ``current`` (its jobs draw positions and fold batches here).
        dataset: the calibration dataset (whole; the worker reads only its shards' batches).
        shards: the shards this worker holds.
        session: ``batch_size``, ``backend``, ``intra_op_threads``, ``spill_dir``, ``spill_bytes``.
    """

    def __init__(self, original: onnx.ModelProto, current: onnx.ModelProto, plan: LevelPlan, dataset: Any,
                 shards: Sequence[Shard], session: dict[str, Any]) -> None:
        """Plan the sweep; no data is read yet."""
        self.current, self.plan = current, plan
        self.sweep = plan.sweep(original, current, dataset, **session)
        self.shards = {shard.index: shard for shard in shards}
        self.done = dict.fromkeys(self.shards, -1)  # per shard, the last step it ran
        self.applied = 0

    def fold(self, level: int, shard: int, updates: Sequence[LayerUpdate | None]) -> list[Any]:
        """Every job's moments of ``level`` over one shard. ``updates``: one per level solved so far, in order
        (None: already in this worker's model, which is the driver's)."""
        for update in updates[self.applied:]:
            if update is not None:
                update.apply(self.current)
        if len(updates) > self.applied:
            self.sweep.invalidate()
            self.applied = len(updates)
        batches = self.shards[shard].batches
        for step in range(self.done[shard] + 1, level):  # replay, or steps without jobs
            for _ in self.sweep.run(step, batches, self.plan.indices):
                pass
        self.plan.fold(self.sweep, level, batches)
        self.done[shard] = level
        return [job.take() for job in self.plan.jobs[level]]

    def spilled_bytes(self) -> int:
        """The largest size the frontier's spill files reached (what the sweep took on disk)."""
        return sum(store.size for store in self.sweep.store.values())

    def seconds(self) -> dict[str, float]:
        """Where this worker's time went: onnxruntime per model, folding batches into moments, writing the spill
        file (seconds, rounded to 0.1 ms)."""
        spill = sum(store.write_s for store in self.sweep.store.values())
        return {"onnxruntime_original": round(self.sweep.seconds["original"], 4),
                "onnxruntime_current": round(self.sweep.seconds["current"], 4),
                "fold": round(self.sweep.seconds["fold"], 4), "spill_write": round(spill, 4)}

    def close(self) -> None:
        """Remove the frontier (files included)."""
        self.sweep.close()


class LocalShards:
    """Every shard in this process: one worker sharing the driver's model (no updates to send)."""

    def __init__(self, original: onnx.ModelProto, current: onnx.ModelProto, plan: LevelPlan, dataset: Any,
                 shards: Sequence[Shard], session: dict[str, Any]) -> None:
        """One :class:`SweepWorker` over all shards."""
        self.shards = list(shards)
        self.worker = SweepWorker(original, current, plan, dataset, shards, session)

    def fold(self, level: int, updates: Sequence[Any]) -> Iterator[tuple[int, list[Any]]]:
        """Each shard's moments of ``level``, in shard order."""
        for shard in self.shards:
            yield shard.index, self.worker.fold(level, shard.index, updates)

    def update(self, model: onnx.ModelProto, plan: LevelPlan, level: int) -> None:
        """Nothing to send: the worker reads the driver's model."""
        return None

    def spilled_bytes(self) -> int:
        """See :meth:`SweepWorker.spilled_bytes`."""
        return self.worker.spilled_bytes()

    def seconds(self) -> dict[str, float]:
        """See :meth:`SweepWorker.seconds`."""
        return self.worker.seconds()

    def close(self) -> None:
        """Remove the frontier."""
        self.worker.close()


def sweep_levels(original: onnx.ModelProto, out: onnx.ModelProto, plan: LevelPlan, dataset: Any,
                 shards: Sequence[Shard], *, progress: bool, session: dict[str, Any],
                 executor: Any | None = None) -> tuple[list[Any], list[tuple[str, str]], dict[str, Any]]:
    """Run the plan's levels in order: every shard's moments (``executor``: the shards on Ray workers, see
    :func:`pipeline.cluster.recovery_on_ray`; default: :class:`LocalShards`), merged in shard order, solved into
    ``out`` (in place) before the next level. Returns what was done, what was skipped, and how the sweep went
    (levels, shards, workers, ``solve_s``: the driver's merge and solve time, ``moment_bytes``: moments received,
    ``spill_bytes``: the largest size of the frontier's spill files in this process, ``seconds``: where the sweep's
    time went in this process, :meth:`SweepWorker.seconds`; both None on Ray)."""
    import time

    from tqdm import tqdm

    if not shards:
        if executor is not None:
            executor.close()
        raise CalibrationError("the recovery dataset yielded no samples")
    runner = executor if executor is not None else LocalShards(original, out, plan, dataset, shards, session)
    done: list[Any] = []
    skipped: list[tuple[str, str]] = []
    updates: list[Any] = []
    levels = sorted(plan.jobs)
    record = {"levels": len(levels), "shards": len(shards), "workers": getattr(runner, "workers", 1),
              "solve_s": 0.0, "moment_bytes": 0}
    try:
        with tqdm(total=len(levels) * len(shards), desc="recover", unit="shard", file=sys.stderr,
                  disable=not progress) as bar:
            for level in levels:
                jobs = plan.jobs[level]
                merged: OrderedMerge[list[Any]] = OrderedMerge(
                    lambda total, part, jobs=jobs: [j.merge(a, b) for j, a, b in zip(jobs, total, part, strict=True)])
                for index, parts in runner.fold(level, updates):
                    start = time.perf_counter()
                    merged.add(index, parts)
                    record["moment_bytes"] += nbytes(parts)
                    record["solve_s"] += time.perf_counter() - start
                    bar.update(1)
                start = time.perf_counter()
                for job, moments in zip(jobs, merged.result(len(shards)), strict=True):
                    got, missed = job.finish(moments)
                    done += got
                    skipped += missed
                updates.append(runner.update(out, plan, level))
                record["solve_s"] += time.perf_counter() - start
        spilled = getattr(runner, "spilled_bytes", None)  # Ray workers keep their frontier to themselves
        record["spill_bytes"] = spilled() if spilled is not None else None
        seconds = getattr(runner, "seconds", None)  # and their timings
        record["seconds"] = seconds() if seconds is not None else None
    finally:
        runner.close()
    record["solve_s"] = round(record["solve_s"], 3)
    return done, skipped, record


def nbytes(value: Any) -> int:
    """Bytes of the arrays inside nested dicts, lists, tuples and dataclasses (moment parts)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0
