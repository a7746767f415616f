"""Streaming calibration: run a model over labelled data and accumulate per-probe sufficient statistics.

For every probe tensor ``A`` (shape ``(N, C, H, W)``, or ``(N, C)``) and every batch, the pooled feature matrix
``X`` (``N x d``, float64, ``d = C * cells``) is folded into :class:`pipeline.calibration.stats.ProbeStats` (class counts, sums,
per-class sums, the uncentred Gram matrix ``X^T X``, and per-channel zero counts / absolute sums of the raw
activations). The pooling runs *inside the graph* (:func:`graph_ops.probes.add_pooled_probes`: a float64 ``Cast``
and a spatial ``ReduceSum`` right after each probe's producer), so onnxruntime returns ``O(N C)`` numbers per probe
and memory and transfer scale with channels, never with channels x positions or with the number of samples.

Pooling (``POOLINGS``): ``auto`` (the default) chooses per probe what its consumers read (:mod:`pipeline.calibration.pooling`: the
grid a Flatten -> Gemm head sees, global average before global pooling, 2 x 2 otherwise when the data holds 10
samples per feature, within a feature budget)
and records it per probe in the statistics; ``gap`` averages over all spatial positions (``cells = 1``); ``avgK`` is
K x K adaptive
average pooling with the bin edges of ``torch.nn.AdaptiveAvgPool2d`` (bin ``i`` of an axis of length ``L`` covers
``[floor(i L / K), ceil((i + 1) L / K))``), giving ``cells = K * K`` features per channel laid out channel-major:
feature ``c * cells + i * K + j`` is bin ``(i, j)`` of channel ``c``. Two-dimensional probes ``(N, C)`` have
``cells = 1`` under every pooling. The graph returns float64 bin sums; the features are ``sums / positions``.
Zero counts and absolute sums (``summaries``; only the activation scorers ``mean-act`` / ``apoz`` read them) are
``positions - ReduceSum(|Sign(A)|)`` and ``ReduceL1(A)`` per sample and channel, also in the graph.

Preconditions checked per batch (each failure is a :class:`~pipeline.errors.CalibrationError` naming the tensor):
inputs match the model's input names, ranks, static dimensions and dtypes, and are finite; labels are present (when
required), integer, non-negative and below the number of classes of a ``(N, K)`` output; every pooled feature is
finite (a NaN or Inf anywhere in a bin makes its sum non-finite, so checking the pooled features is exhaustive).
After the pass: at least two classes are present (when labels are required); a WARNING is logged when there are
fewer than ``10 * d`` samples for the widest probe or fewer than 5 samples in a class.

Labels (:mod:`pipeline.data.targets`): the data's per-image classes, or (``--labels model``, and by default for a method
that needs labels when the data has none) the model's own decisions, ``argmax`` of its ``(N, K)`` output fetched in
the same run as the probes. Dense targets (class maps, boxes, class sequences, from the data or from the model's
dense output) are location-aware: every sample of the statistics is a location of a probe paired with its label
(:mod:`pipeline.calibration.calibrate_locations`, methods.md §8); the statistics then record the targets and per-probe views.

The statistics are computed on the prepared (canonical) model - the graph that analysis and surgery use - and
``model_sha256`` is the sha256 of the file. The file is never modified. The data is cut into fixed shards
(:mod:`pipeline.data.shards`): batches are folded in order into their shard's sums and the shard sums are merged in shard
order, so the same inputs give identical statistics, whether one process computes every shard or Ray workers
compute them (``cluster``: :mod:`pipeline.cluster`, one task per shard, :class:`ShardJob` shipped to each).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graph_ops.errors import PreconditionError
from graph_ops.probes import PooledProbe, add_pooled_probes
from pipeline.calibration.calibrate_locations import channel_summary, location_job
from pipeline.calibration.pooling import MIN_SAMPLES_PER_FEATURE, consumer_bins
from pipeline.calibration.stats import (
    CalibrationStats,
    ProbeAccumulator,
    ProbeStats,
    channel_summaries,
    merge_probes,
)
from pipeline.data.outputs import argmax_classes
from pipeline.data.shards import SHARD_BATCHES, OrderedMerge, Shard, shard_layout
from pipeline.data.targets import LabelOptions, Targets, resolve_targets
from pipeline.errors import CalibrationError, UserInputError
from pipeline.model.prepare import PreparedModel, as_prepared, default_probes
from pipeline.model.runtime import (
    Batch,
    check_labels,
    fixed_batch,
    open_session,
    output_classes,
    samples_per_run,
    stream,
)

__all__ = ["DEFAULT_POOLING", "POOLINGS", "ShardJob", "calibrate", "channel_summaries", "default_probes", "merge_probes"]

logger = logging.getLogger(__name__)

POOLINGS: dict[str, int] = {"auto": 0, "gap": 1, "avg2": 2, "avg4": 4}
"""Pooling name -> K of the K x K adaptive average pooling (``gap`` = 1 x 1; ``auto``: per probe, what its consumers
read, :mod:`pipeline.calibration.pooling`)."""
DEFAULT_POOLING = "auto"

MIN_SAMPLES_PER_DIM = MIN_SAMPLES_PER_FEATURE
MIN_SAMPLES_PER_CLASS = 5


def _num_classes(model: onnx.ModelProto, dataset: Any, require_labels: bool) -> int:
    """K of a ``(N, K)`` output, else the dataset's ``num_classes``; 1 for label-free statistics."""
    k = output_classes(model) or getattr(dataset, "num_classes", None)
    if k:
        return int(k)
    if require_labels:
        raise CalibrationError("cannot tell the number of classes: the model's first output is not (N, K) logits "
                               "and the dataset does not state num_classes")
    return 1


def _fold(probe: ProbeAccumulator | None, pooled: PooledProbe, values: Mapping[str, np.ndarray], labels: np.ndarray,
          num_classes: int, start: int) -> ProbeAccumulator:
    """Turn one batch of a probe's pooled outputs into features, check them, and fold them into its statistics."""
    shape = values[pooled.shape]
    sums = values[pooled.sums]
    n, channels = int(shape[0]), int(shape[1])
    positions = math.prod(int(d) for d in shape[2:])
    if pooled.bin_sizes is None or len(shape) == 2:
        features, cells = sums.reshape(n, channels) / positions, 1
    else:
        cells = len(pooled.bin_sizes)
        features = (sums.reshape(n, channels, cells) / np.asarray(pooled.bin_sizes, np.float64)).reshape(n, -1)
    if not np.isfinite(features).all():
        raise CalibrationError(f"activation '{pooled.tensor}' has NaN or Inf values (batch from sample {start}) "
                               f"although the inputs are finite; check the input scaling (--scale/--mean/--std)")
    if probe is None:
        probe = ProbeAccumulator(channels, cells, num_classes)
    probe.add(features, labels, channel_summary(pooled, values))
    return probe


def _check_amount(stats: Mapping[str, ProbeStats], require_labels: bool, targets: Targets | None = None) -> None:
    """Error on a single class; warn when the sample counts are small for the feature dimension."""
    first = next(iter(stats.values()))
    counts = np.asarray(first.class_counts)
    present = np.flatnonzero(counts)
    if require_labels and len(present) < 2:
        if targets is not None and targets.source == "model":
            raise CalibrationError(f"the model's own decisions on the {first.n} calibration samples are all class "
                                   f"{int(present[0])} (one class); DI/LDA/PLS need at least two: give more varied "
                                   f"data, or labels (--labels data)")
        raise CalibrationError(f"all {first.n} calibration samples have the same label ({int(present[0])}); "
                               f"DI/LDA/PLS need at least two classes")
    widest = max(stats, key=lambda p: stats[p].sum.shape[0])
    d = stats[widest].sum.shape[0]
    if first.n < MIN_SAMPLES_PER_DIM * d:
        logger.warning("only %d calibration samples for probe '%s' with %d features (channels x cells); about "
                       "%d (10 per feature) are needed for stable scatter matrices", first.n, widest, d,
                       MIN_SAMPLES_PER_DIM * d)
    if require_labels and counts[present].min() < MIN_SAMPLES_PER_CLASS:
        smallest = int(present[np.argmin(counts[present])])
        logger.warning("class %d has only %d calibration samples (fewer than %d per class); %d of %d classes have "
                       "none", smallest, int(counts[smallest]), MIN_SAMPLES_PER_CLASS, len(counts) - len(present),
                       len(counts))


def _labels(labels: np.ndarray | None, n: int, num_classes: int, require_labels: bool) -> np.ndarray:
    if labels is None and require_labels:
        raise CalibrationError("DI/LDA/PLS need labels; the dataset has none. Use labelled data (an .npz with a "
                               "'y' array, or an image folder with one sub-folder per class), the model's own "
                               "decisions (--labels model) or a data-free method (l1, l2, random)")
    if labels is None or (num_classes == 1 and not require_labels):
        return np.zeros(n, np.int64)
    return check_labels(labels, n, num_classes)


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one calibration runs (small and picklable: it is what a Ray task receives).

    Attributes:
        model: the serialized model with pooled probes (:func:`graph_ops.probes.add_pooled_probes`).
        specs: the model's inputs (:func:`pipeline.model.runtime.model_input_specs`).
        pooled: the probes' pooled outputs.
        num_classes: K of the statistics.
        require_labels: refuse unlabelled data.
        batch_size: samples per onnxruntime call (shards start on batch boundaries).
        backend: onnxruntime backend (``auto``, ``ort-cpu``, ``ort-cuda``).
        intra_op_threads: onnxruntime intra-op threads.
        shard_batches: batches per shard (:mod:`pipeline.data.shards`).
        per_run: samples per onnxruntime call (:func:`pipeline.model.runtime.samples_per_run`; the statistics are the
            same whatever it is, only the memory changes).
        label_output: the kept model output whose ``argmax`` labels every sample (``--labels model``), else None.
    """

    model: bytes
    specs: Mapping[str, tuple[tuple[int | None, ...], np.dtype]]
    pooled: tuple[PooledProbe, ...]
    num_classes: int
    require_labels: bool
    batch_size: int
    backend: str
    intra_op_threads: int | None
    shard_batches: int = SHARD_BATCHES
    per_run: int | None = None
    label_output: str | None = None

    @property
    def outputs(self) -> list[str]:
        """The graph outputs every batch fetches."""
        first = [self.label_output] if self.label_output else []
        return first + [name for p in self.pooled for name in (p.shape, p.sums, p.nonzero, p.abs_sum) if name]

    def batches(self, dataset: Any, *, progress: bool) -> Iterable[Batch]:
        """The pooled outputs of every batch of ``dataset``, in order (one onnxruntime session)."""
        session = open_session(self.model, self.backend, self.intra_op_threads)
        return stream(session, dataset, self.outputs, self.specs, batch_size=self.batch_size, stage="calibrate",
                      progress=progress, per_run=self.per_run, shapes={p.shape for p in self.pooled})

    def fold(self, batches: Iterable[Batch], first_sample: int = 0) -> dict[str, ProbeStats]:
        """The statistics of a run of batches (one shard), folded in order."""
        running: dict[str, ProbeAccumulator] = {}
        for batch in batches:
            values = dict(zip(self.outputs, batch.outputs, strict=True))
            labels = (argmax_classes(values[self.label_output]) if self.label_output else
                      _labels(batch.labels, batch.size, self.num_classes, self.require_labels))
            for probe in self.pooled:
                running[probe.tensor] = _fold(running.get(probe.tensor), probe, values, labels, self.num_classes,
                                              first_sample + batch.start)
        return {name: acc.freeze() for name, acc in running.items()}

    def shard(self, dataset: Any, shard: Shard) -> dict[str, ProbeStats]:
        """The statistics of one shard of ``dataset`` (what a Ray task computes)."""
        part = dataset.subset(shard.start, shard.stop)
        return self.fold(self.batches(part, progress=False), shard.start)

    def local(self, dataset: Any, shards: Sequence[Shard], *, progress: bool) -> dict[str, ProbeStats]:
        """Every shard in this process (one stream over the data), merged in shard order."""
        merged: OrderedMerge[dict[str, ProbeStats]] = OrderedMerge(merge_probes)
        batches = self.batches(dataset, progress=progress)
        for index, group in itertools.groupby(batches, key=lambda b: b.index // self.shard_batches):
            merged.add(index, self.fold(group))
        return merged.result(len(shards))


def calibrate(model: PreparedModel | str | os.PathLike[str], dataset: Any, *, probes: Sequence[str] | None = None,
              pooling: str = DEFAULT_POOLING, batch_size: int = 64, backend: str = "auto",
              intra_op_threads: int | None = None, progress: bool = True, require_labels: bool = True,
              summaries: bool = True, cluster: Any | None = None, shard_batches: int = SHARD_BATCHES,
              labels: LabelOptions | None = None, seed: int = 0) -> CalibrationStats:
    """Stream a dataset through a model and return per-probe sufficient statistics.

    Args:
        model: the prepared model (:func:`pipeline.model.prepare.prepare`), or an ONNX file (prepared here; never
            modified; its sha256 identifies the statistics). A prepared model with a task records it in the
            statistics; ``dataset`` must then hold task labels (:meth:`pipeline.data.task.Task.dataset`).
        dataset: a :class:`pipeline.data.datasets.Dataset` (``batches(batch_size)`` yields ``(feeds, labels)``).
        probes: tensors to measure; default: all probes of all prunable groups of the canonical model.
        pooling: ``auto`` (per probe), ``gap``, ``avg2`` or ``avg4`` (see the module docstring).
        batch_size: samples per onnxruntime call.
        backend: ``auto`` (CUDA EP when really active, else CPU), ``ort-cpu`` or ``ort-cuda``.
        intra_op_threads: onnxruntime intra-op threads (default: onnxruntime's choice; on Ray workers: the
            worker's CPUs).
        progress: show a tqdm bar on stderr.
        require_labels: the method needs labels (DI/LDA/PLS): fail on a single class, and take the model's own
            decisions when the data has none (unless ``labels`` says ``data``).
        summaries: also count zeros and absolute sums per channel (what ``mean-act`` / ``apoz`` read; two more
            reductions per probe).
        cluster: :class:`pipeline.cluster.RayOptions` to compute the shards on Ray workers (same statistics to the
            last bit); None: in this process.
        shard_batches: batches per shard (the statistics depend on it in the last bits, never on the workers).
        labels: where the labels come from (:class:`pipeline.data.targets.LabelOptions`: ``--labels``,
            ``--output-kind``, decoder thresholds, location sampling); None: the defaults.
        seed: seed of the location sampling of dense targets.

    Returns:
        The statistics, keyed by probe tensor name.

    Raises:
        CalibrationError: data that does not fit the model, NaN/Inf, missing or bad labels, one class.
        UserInputError: unreadable model, unknown probe name, pooling or backend; Ray options without Ray or with
            in-memory data.
    """
    if pooling not in POOLINGS:
        raise UserInputError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    if dataset is None:
        raise CalibrationError("calibration needs data: give a dataset (e.g. --data mnist or an .npz file)")
    if batch_size < 1:
        raise UserInputError(f"batch size must be positive, got {batch_size}")
    prepared = as_prepared(model)  # first: clear errors for a missing or broken file
    names = tuple(dict.fromkeys(probes)) if probes is not None else prepared.probes
    if not names:
        raise CalibrationError(f"{prepared.path} has no prunable channel groups, so there is nothing to calibrate")
    targets = resolve_targets(prepared.model, dataset, labels, require=require_labels,
                              image_classes=lambda: _num_classes(prepared.model, dataset, require_labels))
    if targets is not None and targets.dense:
        job: Any = location_job(prepared, names, targets, summaries=summaries, seed=seed, batch_size=batch_size,
                                backend=backend, intra_op_threads=intra_op_threads, shard_batches=shard_batches)
    else:
        job = _pooled_job(prepared, dataset, names, pooling, targets, require_labels, summaries, batch_size, backend,
                          intra_op_threads, shard_batches)
    batch_size = job.batch_size
    shards = shard_layout(getattr(dataset, "num_samples", 0), batch_size, shard_batches)
    if not shards:
        raise CalibrationError("the calibrate dataset yielded no samples")
    if cluster is not None:
        from pipeline.cluster import calibrate_on_ray

        stats = calibrate_on_ray(cluster, job, dataset, shards, progress=progress)
    else:
        stats = job.local(dataset, shards, progress=progress)
    _check_amount(stats, require_labels, targets)
    logger.info("calibrated %d probes on %d samples in %d shards (pooling %s)", len(stats),
                next(iter(stats.values())).n, len(shards), pooling)
    record = None if targets is None else targets.to_dict()
    if isinstance(job, ShardJob) or targets is None:
        num_classes = job.num_classes if isinstance(job, ShardJob) else 1
    else:
        num_classes = targets.num_classes
        record = {**(record or {}), "views": {lay.tensor: lay.kind for lay in job.layouts},
                  "samples": getattr(dataset, "num_samples", 0)}
    return CalibrationStats(model_sha256=prepared.sha256, dataset=str(getattr(dataset, "name", type(dataset).__name__)),
                            pooling=pooling, num_classes=num_classes, probes={p: stats[p] for p in names},
                            task=prepared.task.to_dict() if prepared.task else None, targets=record)


def _pooled_job(prepared: PreparedModel, dataset: Any, names: Sequence[str], pooling: str, targets: Targets | None,
                require_labels: bool, summaries: bool, batch_size: int, backend: str, intra_op_threads: int | None,
                shard_batches: int) -> ShardJob:
    """The job of a calibration with pooled image features (per-image labels from the data or the model's argmax
    fetched in the same run, or none)."""
    label_output = prepared.model.graph.output[0].name if targets is not None and targets.source == "model" else None
    try:
        bins = (consumer_bins(prepared.model, prepared.index, names, getattr(dataset, "num_samples", None))
                if pooling == "auto" else POOLINGS[pooling])
        pooled_model, pooled = add_pooled_probes(prepared.model, names, bins=bins, summaries=summaries,
                                                 last_axis=prepared.index.last_axis,
                                                 keep_outputs=[label_output] if label_output else [],
                                                 sizes=prepared.index.shapes)
    except PreconditionError as err:
        raise CalibrationError(str(err)) from err
    num_classes = targets.num_classes if targets is not None else _num_classes(prepared.model, dataset, False)
    specs = prepared.input_specs  # the prepared input sizes; a dynamic batch stays free (whole batches per call)
    batch_size = fixed_batch(specs, batch_size)  # a static batch is what every onnxruntime call gets
    return ShardJob(pooled_model.SerializeToString(), specs, tuple(pooled), num_classes,
                    require_labels and label_output is None, batch_size, backend, intra_op_threads, shard_batches,
                    samples_per_run(prepared.model, batch_size, shapes=prepared.index.shapes), label_output)
