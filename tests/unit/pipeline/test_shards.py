"""Fixed shards without Ray: the layout, the ordered merge, and that statistics and recovery computed shard by shard
by separate workers (in this process) equal those of one pass, to the last bit."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import numpy as np
import onnx
import pytest

from graph_ops.prune import apply_plan
from pipeline.calibration.calibrate import calibrate
from pipeline.calibration.stats import merge_probes
from pipeline.data.datasets import mnist_path
from pipeline.data.named import open_dataset
from pipeline.data.shards import OrderedMerge, assign, shard_layout
from pipeline.model.prepare import prepare
from pipeline.prune.orchestrate import keep_lists, score
from pipeline.recovery import RECOVERY, RecoveryOptions, recover
from pipeline.recovery.worker import LayerUpdate, SweepWorker, sweep_levels
from pipeline.selection.allocate import select_channels


@pytest.mark.parametrize(("samples", "batch", "per_shard"), [(1000, 64, 4), (256, 64, 4), (7, 3, 1), (1, 8, 4)])
def test_shards_cover_every_sample_once_on_batch_boundaries(samples: int, batch: int, per_shard: int) -> None:
    shards = shard_layout(samples, batch, per_shard)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert shards[0].start == 0 and shards[-1].stop == samples
    assert all(a.stop == b.start and a.stop_batch == b.first_batch for a, b in itertools.pairwise(shards))
    assert all(s.start == s.first_batch * batch and len(s.batches) <= per_shard for s in shards)
    assert sum(len(s.batches) for s in shards) == -(-samples // batch)
    for workers in (1, 2, 3, 10):
        dealt = assign(shards, workers)
        assert sorted(s.index for group in dealt for s in group) == [s.index for s in shards]
        assert len(dealt) == min(workers, len(shards))


def test_ordered_merge_folds_left_to_right_whatever_the_arrival_order() -> None:
    values = [0.1, 1e16, -1e16, 0.2, 0.3]  # float addition is not associative: the order shows in the result
    want = (((values[0] + values[1]) + values[2]) + values[3]) + values[4]
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        merged: OrderedMerge[float] = OrderedMerge(lambda a, b: a + b)
        for i in order:
            merged.add(i, values[i])
        assert merged.result(len(values)) == want


@pytest.fixture(scope="module")
def mnist() -> tuple:
    prepared = prepare(mnist_path().with_name("mnist_cnn.onnx"))
    return prepared, open_dataset("mnist", split="train", limit=600)


@pytest.mark.slow
def test_statistics_are_the_left_fold_of_shards_calibrated_separately(mnist: tuple) -> None:
    """Each shard calibrated on its own (as a Ray task would) and merged in shard order gives exactly the
    statistics of one calibration over all the data."""
    prepared, data = mnist
    whole = calibrate(prepared, data, batch_size=50, shard_batches=3, progress=False)
    shards = shard_layout(data.num_samples, 50, 3)
    assert len(shards) == 4
    parts = [calibrate(prepared, data.subset(s.start, s.stop), batch_size=50, shard_batches=3, progress=False)
             for s in shards]
    merged = dict(parts[0].probes)
    for part in parts[1:]:
        merged = merge_probes(merged, part.probes)
    for name, stats in whole.probes.items():
        for field in ("class_counts", "sum", "class_sums", "gram", "zeros", "abs_sum"):
            assert np.array_equal(getattr(stats, field), getattr(merged[name], field)), (name, field)


class _Workers:
    """Shards dealt to several in-process workers, each with its own copy of the pruned model (what Ray actors
    hold); ``restart`` replaces a worker by a fresh one before the given level (what Ray does after a crash)."""

    def __init__(self, planner, original: onnx.ModelProto, out: onnx.ModelProto, data, shards, session: dict,
                 count: int, restart: int | None = None) -> None:
        self.args = planner, original, copy.deepcopy(out), data, session
        self.groups = assign(shards, count)
        self.workers = [self._new(group) for group in self.groups]
        self.restart, self.restarted = restart, 0

    def _new(self, group) -> SweepWorker:
        planner, original, out, data, session = self.args
        current = copy.deepcopy(out)
        return SweepWorker(original, current, planner(original, current), data, group, session)

    def fold(self, level: int, updates: list) -> Iterator[tuple[int, list]]:
        if level == self.restart:
            self.workers[0].close()
            self.workers[0] = self._new(self.groups[0])
            self.restarted += 1
        for group, worker in zip(self.groups, self.workers, strict=True):
            for shard in reversed(group):  # any order: the driver merges in shard order
                yield shard.index, worker.fold(level, shard.index, updates)

    def update(self, model, plan, level: int) -> LayerUpdate:
        return LayerUpdate.of(model, plan, level)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lstsq", "regress"])
def test_recovery_by_separate_workers_equals_one_process_and_survives_a_restart(mnist: tuple, method: str) -> None:
    prepared, data = mnist
    keep = keep_lists(select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.4))
    pruned = apply_plan(prepared.model, prepared.index, keep)
    reference, _ = recover(prepared.model, pruned, prepared.index, keep, data, method=method, batch_size=50,
                           shard_batches=2)
    opts = RecoveryOptions(batch_size=50, shard_batches=2)
    planner = RECOVERY[method]

    def bound(original, current):
        return planner(original, current, prepared.index, keep, opts)

    shards = shard_layout(data.num_samples, 50, 2)
    for count, restart in ((2, False), (3, True)):
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
        plan = bound(prepared.model, out)
        last = max(plan.jobs)  # a worker restarted before the last level replays every step before it
        workers = _Workers(bound, prepared.model, out, data, shards, opts.session(), count, last if restart else None)
        sweep_levels(prepared.model, out, plan, data, shards, progress=False, session=opts.session(),
                     executor=workers)
        assert workers.restarted == int(restart) and last >= 1
        assert out.SerializeToString() == reference.SerializeToString(), (count, restart)
