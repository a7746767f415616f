"""Location-aware calibration: the statistics of dense targets pair each probe's feature vector at a location with
the label of that location (methods.md §8).

For a probe ``A`` ``(N, C, h, w)`` and an image ``n``, every grid cell ``(i, j)`` offers the C-vector
``f_n(i, j) = A[n, :, i, j]`` and a label ``y_n(i, j)`` (:mod:`pipeline.data.locations`: the class map resampled to the
probe's grid, the boxes rasterised on it, the time steps resampled along its width). A class-balanced sample of
cells per image (:func:`pipeline.data.locations.sample_cells`) enters the same streamed float64 sufficient statistics as
pooled image features (:class:`pipeline.calibration.stats.ProbeStats`, ``cells = 1``, ``d = C``): with ``L`` the sampled
locations of all images,

    ``n = |L|``, ``n_k = |{l in L: y_l = k}|``, ``s = sum_l f_l``, ``s_k = sum_{y_l = k} f_l``, ``G = sum_l f_l f_lᵀ``,

so ``μ``, ``S = G − n μ μᵀ``, ``D[:, k] = √n_k (μ_k − μ)`` and DI / LDA / PLS-VIP on top are unchanged: DI measures
how well the probe's channels separate the classes of the *locations* (objects vs background and between objects,
characters vs blank, segments), which is what a detector, segmenter or CTC recognizer decides, where one pooled
vector per image would mix every object of the image. ``line`` views (sequence targets) average each column over the
probe's height first; ``pooled`` views pair the image's pooled vector with each location sampled on a reference grid
(:mod:`pipeline.data.locations`).

Where the gather runs: when the labels are known before a batch runs (class maps and boxes from the data) and every
grid is static, the sampled positions are fed to the graph (an int32 input per probe) and gathered inside it
(:func:`graph_ops.probes.add_location_views` with ``gather``): onnxruntime returns ``(N, C, M)`` for ``M`` sampled
positions, never the activation. When the labels come from the model's own output (``--labels model``) or need it
(text aligned through the CTC output), the output is fetched in the same run as the probes' views (no second pass),
the labels are decoded from it (:mod:`pipeline.data.outputs`) and the positions gathered in numpy from views fetched whole
or, on grids of more than ``CANDIDATE_CELLS`` cells, from their seeded candidate cells gathered inside the graph
(:func:`pipeline.data.locations.candidate_cells`: the sample is drawn among them); then the batch is sized so that its
fetched views stay within ``FETCH_BYTES`` and each onnxruntime call within :data:`pipeline.model.runtime.RUN_BYTES`
(views of sequence targets are height means, ``(N, C, w)``, so an OCR recognizer fetches little).

Reproducibility: the sampled positions depend on ``(seed, sample index, probe)`` only; batches are folded in order
into their shard's sums and shards merged in shard order (:mod:`pipeline.data.shards`), so one process and Ray workers give
the same statistics to the last bit. Heads of more than ``SPARSE_CLASSES`` classes keep per-class sums for the
classes seen only (``ProbeStats.class_ids``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graph_ops.errors import PreconditionError
from graph_ops.probes import LocationView, PooledProbe, add_location_views
from pipeline.calibration.stats import ChannelSummary, ProbeAccumulator, ProbeStats, merge_probes
from pipeline.data.locations import (
    CANDIDATE_CELLS,
    ClassCounts,
    ProbeView,
    candidate_cells,
    grid_labels,
    location_rng,
    sample_cells,
    view_of,
)
from pipeline.data.outputs import ctc_align, ctc_best_path, detections_as_boxes, map_classes, yolo_decode
from pipeline.data.shards import SHARD_BATCHES, OrderedMerge, Shard
from pipeline.data.targets import Targets
from pipeline.errors import CalibrationError
from pipeline.model.prepare import PreparedModel
from pipeline.model.runtime import (
    LIVE_TENSORS,
    RUN_BYTES,
    Batch,
    InputSpecs,
    fixed_batch,
    open_session,
    static_batch,
    stream,
)

logger = logging.getLogger(__name__)

FETCH_BYTES = 256 << 20
"""At most about this many bytes of fetched probe views (and model outputs) per batch (the batch shrinks for large
views; a model with a static batch keeps its own)."""
SPARSE_CLASSES = 256
"""Heads with more classes keep per-class sums only for the classes seen."""

Pick = tuple[np.ndarray, np.ndarray, np.ndarray]  # positions, their labels, their columns in the view's output
Picks = list[list[Pick]]  # per view, per sample
Fed = list[list[np.ndarray] | None]  # per view: per sample the positions fed to its gather (None: not gathered)


def channel_summary(pooled: PooledProbe, values: Mapping[str, np.ndarray]) -> ChannelSummary | None:
    """A probe's zero counts and absolute sums of one batch, from its pooled outputs (None without summaries)."""
    if pooled.nonzero is None or pooled.abs_sum is None:
        return None
    shape = values[pooled.shape]
    n, channels = int(shape[0]), int(shape[1])
    positions = math.prod(int(d) for d in shape[2:])
    nonzero = values[pooled.nonzero].reshape(n, channels).sum(axis=0)
    return ChannelSummary(zeros=np.rint(n * positions - nonzero).astype(np.int64),
                          abs_sum=values[pooled.abs_sum].reshape(n, channels).sum(axis=0), elements=n * positions)


@dataclass(frozen=True)
class LocationJob:
    """What every shard of one location-aware calibration runs (small and picklable: what a Ray task receives).

    Attributes:
        model: the serialized model with location views (:func:`graph_ops.probes.add_location_views`).
        specs: the data's inputs (the model's inputs without the gather indices).
        views: the views' graph outputs, one per probe.
        layouts: per view its kind and static grid (:func:`pipeline.data.locations.view_of`).
        targets: what the locations are labelled with.
        label_output: the model output the labels are decoded from (model labels, text alignment), else None.
        summaries: pooled zero counts / absolute sums per probe (empty without summaries).
        seed: seed of the location sampling.
        candidates: with labels from the output, the cells fetched of a gathered view
            (:func:`pipeline.data.locations.candidate_cells`).
        batch_size, backend, intra_op_threads, shard_batches, per_run: as :class:`pipeline.calibration.calibrate.ShardJob`.
    """

    model: bytes
    specs: InputSpecs
    views: tuple[LocationView, ...]
    layouts: tuple[ProbeView, ...]
    targets: Targets
    label_output: str | None
    summaries: tuple[PooledProbe, ...]
    seed: int
    batch_size: int
    backend: str
    intra_op_threads: int | None
    shard_batches: int = SHARD_BATCHES
    per_run: int | None = None
    candidates: int = CANDIDATE_CELLS

    @property
    def gathered(self) -> bool:
        """True when some view is gathered inside the graph at positions fed before each batch runs."""
        return any(v.gather is not None for v in self.views)

    @property
    def outputs(self) -> list[str]:
        """The graph outputs every batch fetches."""
        names = [self.label_output] if self.label_output else []
        names += [name for v in self.views for name in (v.output, v.shape)]
        return names + [n for p in self.summaries for n in (p.shape, p.nonzero, p.abs_sum) if n]

    def batches(self, dataset: Any, *, progress: bool, first_sample: int = 0
                ) -> Iterator[tuple[Batch, Picks | None, Fed | None]]:
        """Every batch of ``dataset`` with its outputs (one onnxruntime session), its picks when they were made
        before it ran, and the positions fed to its gathers (sample ``i`` of ``dataset`` is sample
        ``first_sample + i`` of the calibration)."""
        # short-lived settings: idle pool threads must not spin, the previous batch's Gram updates (BLAS) run
        # meanwhile (measured on the OCR recognizer: 47 s -> 27 s for the same calibration)
        session = open_session(self.model, self.backend, self.intra_op_threads, short_lived=True)
        fed: dict[int, tuple[Picks | None, Fed]] = {}

        def extra(start: int, feeds: Mapping[str, np.ndarray], labels: Any) -> dict[str, np.ndarray]:
            n = next(iter(feeds.values())).shape[0]
            picks, positions = None, self._candidates(first_sample + start, n)
            if self.label_output is None:  # labels known now: gather exactly the sampled positions
                picks = self._pick(dataset.targets.take(start, start + n), None, first_sample + start, n)
                positions = [None if view.gather is None else [p[0] for p in per_view]
                             for view, per_view in zip(self.views, picks, strict=True)]
            fed[start] = (picks, positions)
            return {view.gather: _indices(pos, n) for view, pos in zip(self.views, positions, strict=True)
                    if view.gather is not None and pos is not None}

        shapes = {v.shape for v in self.views} | {p.shape for p in self.summaries}
        for batch in stream(session, dataset, self.outputs, self.specs, batch_size=self.batch_size,
                            stage="calibrate", progress=progress, per_run=self.per_run, shapes=shapes,
                            extra=extra if self.gathered else None):
            yield batch, *fed.pop(batch.start, (None, None))

    def fold(self, dataset: Any, batches: Iterable[tuple[Batch, Picks | None, Fed | None]],
             first_sample: int = 0) -> dict[str, ProbeStats]:
        """The statistics of a run of batches of ``dataset`` (one shard; sample indices from ``first_sample``)."""
        running: dict[str, ProbeAccumulator] = {}
        sparse = self.targets.num_classes > SPARSE_CLASSES
        for batch, picks, positions in batches:
            values = dict(zip(self.outputs, batch.outputs, strict=True))
            if picks is None:
                picks = self._pick(self._batch_targets(dataset, batch, values), values, first_sample + batch.start,
                                   batch.size, positions)
            for view, per_view, summary in itertools.zip_longest(self.views, picks, self.summaries):
                rows, labels, weights = _rows(view.kind, values[view.output], per_view)
                acc = running.get(view.tensor)
                if acc is None:
                    acc = running[view.tensor] = ProbeAccumulator(rows.shape[1], 1, self.targets.num_classes,
                                                                  sparse=sparse)
                if not np.isfinite(rows).all():
                    raise CalibrationError(f"activation '{view.tensor}' has NaN or Inf values (batch from sample "
                                           f"{first_sample + batch.start}) although the inputs are finite; check the "
                                           f"input scaling (--scale/--mean/--std)")
                acc.add(rows, labels, None if summary is None else channel_summary(summary, values), weights)
        return {name: acc.freeze() for name, acc in running.items()}

    def shard(self, dataset: Any, shard: Shard) -> dict[str, ProbeStats]:
        """The statistics of one shard of ``dataset`` (what a Ray task computes)."""
        part = dataset.subset(shard.start, shard.stop)
        return self.fold(part, self.batches(part, progress=False, first_sample=shard.start), shard.start)

    def local(self, dataset: Any, shards: Sequence[Shard], *, progress: bool) -> dict[str, ProbeStats]:
        """Every shard in this process (one stream over the data), merged in shard order."""
        merged: OrderedMerge[dict[str, ProbeStats]] = OrderedMerge(merge_probes)
        batches = self.batches(dataset, progress=progress)
        for index, group in itertools.groupby(batches, key=lambda b: b[0].index // self.shard_batches):
            merged.add(index, self.fold(dataset, group))
        return merged.result(len(shards))

    # ------------------------------------------------------------------------------------------- per batch

    def _batch_targets(self, dataset: Any, batch: Batch, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Per sample of the batch its target: read from the data, or decoded from the model's output."""
        t = self.targets
        out = None if self.label_output is None else values[self.label_output]
        if t.source == "data" and t.kind != "sequence":
            return dataset.targets.take(batch.start, batch.start + batch.size)
        if out is None:
            raise CalibrationError("internal: the model's output was not fetched")
        if t.kind == "sequence":
            if t.source == "model":
                return list(ctc_best_path(out))
            path, fits = ctc_align(out, dataset.targets.take(batch.start, batch.start + batch.size), t.decode.blank)
            if not fits.all():
                logger.info("%d text labels longer than the %d time steps: their best path is used", int((~fits).sum()),
                            out.shape[1])
            return list(path)
        if t.kind == "map":
            return list(map_classes(out, t.decode.map_threshold))
        height, width = _input_size(batch)
        return detections_as_boxes(yolo_decode(out, t.decode, num_classes=t.num_classes - 1), height, width)

    def _candidates(self, start: int, n: int) -> Fed:
        """Per view gathered at candidate cells (labels from the output), per sample its candidates."""
        if self.label_output is None:
            return [None] * len(self.views)
        return [None if view.gather is None else
                [candidate_cells(math.prod(int(d) for d in layout.grid), location_rng(self.seed, start + i, view.tensor),
                                 self.candidates) for i in range(n)]
                for view, layout in zip(self.views, self.layouts, strict=True)]

    def _pick(self, targets: Sequence[Any], values: Mapping[str, np.ndarray] | None, start: int, n: int,
              fed: Fed | None = None) -> Picks:
        """Per view and sample the sampled positions, their labels and their columns in the view's output (grids:
        static, or from the fetched views; among the fed candidates of a view gathered at candidates)."""
        if len(targets) != n:
            raise CalibrationError(f"{len(targets)} targets for a batch of {n} samples")
        if self.targets.kind == "map":  # per-class integral images, once per map for every grid
            targets = [ClassCounts.of(t, self.targets.background) for t in targets]
        cache: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}
        picks: Picks = []
        for v, (view, layout) in enumerate(zip(self.views, self.layouts, strict=True)):
            grid = layout.grid if values is None else tuple(int(d) for d in values[view.shape][2:])
            candidates = None if fed is None else fed[v]
            key = (layout.kind, grid)
            if key not in cache:
                cache[key] = [grid_labels(layout.kind, self.targets.kind, t, grid, self.targets.background)
                              for t in targets]
            per_sample = []
            for i, labels in enumerate(cache[key]):
                flat = labels.reshape(-1)
                cells = sample_cells(flat, location_rng(self.seed, start + i, view.tensor), self.targets.sampling,
                                     self.targets.background, None if candidates is None else candidates[i])
                if candidates is not None:  # the view's output holds the candidates' columns
                    columns = np.searchsorted(candidates[i], cells)
                else:  # gathered at exactly these positions, or the whole view
                    columns = np.arange(len(cells)) if view.gather is not None else cells
                per_sample.append((cells, flat[cells], columns))
            picks.append(per_sample)
        return picks


def _input_size(batch: Batch) -> tuple[int, int]:
    """``(H, W)`` of the batch's image input (its first 4-D feed)."""
    for value in batch.feeds.values():
        if np.ndim(value) == 4:
            return int(value.shape[2]), int(value.shape[3])
    raise CalibrationError("YOLO detections are normalised by the input image size, but no input is [N, C, H, W]")


def _indices(positions: list[np.ndarray], n: int) -> np.ndarray:
    """The ``(n, 1, M)`` int32 positions fed to a gather (short rows padded with position 0, never read)."""
    width = max(1, max(len(cells) for cells in positions))
    out = np.zeros((n, 1, width), np.int32)
    for i, cells in enumerate(positions):
        out[i, 0, :len(cells)] = cells
    return out


def _rows(kind: str, value: np.ndarray, per_view: list[Pick]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The sampled locations' features ``(R, C)`` (float64), labels ``(R,)`` and weights of one view for one batch
    (a pooled view: its vector once per class of the image's sampled locations, weighted by their count)."""
    parts, labels, weights = [], [], []
    channels = value.shape[1]
    for i, (_, lab, columns) in enumerate(per_view):
        if kind == "pooled":
            classes, counts = np.unique(lab, return_counts=True)
            parts.append(np.broadcast_to(np.asarray(value[i], np.float64).reshape(1, channels),
                                         (len(classes), channels)))
            labels.append(classes)
            weights.append(counts)
            continue
        parts.append(np.asarray(value[i].reshape(channels, -1)[:, columns].T, np.float64))
        labels.append(lab)
    return (np.concatenate(parts) if parts else np.zeros((0, channels)),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(weights) if weights else None)


def location_job(prepared: PreparedModel, names: Sequence[str], targets: Targets, *, summaries: bool, seed: int,
                 batch_size: int, backend: str, intra_op_threads: int | None, shard_batches: int,
                 candidates: int = CANDIDATE_CELLS) -> LocationJob:
    """The job of a location-aware calibration of ``names`` (see the module docstring for where the gather runs;
    ``candidates``: cells fetched per large grid when the labels come from the output)."""
    model, index = prepared.model, prepared.index
    layouts = []
    for name in names:
        shape = index.shapes.get(name)
        if shape is None:
            raise CalibrationError(f"probe '{name}' has no known shape; fix the input size with --input-shape")
        if name in index.last_axis and len(shape) >= 3:
            shape = (shape[0], shape[-1], *shape[1:-1])
        layouts.append(view_of(name, shape, targets.kind))
    label_output = None
    if targets.source == "model" or targets.kind == "sequence":
        label_output = model.graph.output[0].name
    static = [lay.tensor for lay in layouts if lay.kind != "pooled" and all(d is not None for d in lay.grid)]
    if label_output is None:  # labels known before each batch: gather the sampled positions, when every grid is static
        gather = static if len(static) == sum(lay.kind != "pooled" for lay in layouts) else []
    else:  # labels from the output: fetch the candidate cells of large grids, whole small ones
        gather = [t for t, lay in zip(names, layouts, strict=True)
                  if t in static and math.prod(int(d) for d in lay.grid) > candidates]
    try:
        viewed, views, pooled = add_location_views(model, [(lay.tensor, lay.kind) for lay in layouts], gather=gather,
                                                   last_axis=index.last_axis,
                                                   keep_outputs=[label_output] if label_output else [],
                                                   summaries=summaries)
    except PreconditionError as err:
        raise CalibrationError(str(err)) from err
    specs = prepared.input_specs  # the prepared sizes; a dynamic batch stays free
    batch, per_run = fixed_batch(specs, batch_size), None
    if not static_batch(model):  # fetched views are alive until a call ends, and a whole batch of them after it
        fetched = _fetched_bytes(prepared, layouts, label_output, set(gather), candidates)
        batch = max(1, min(batch_size, FETCH_BYTES // max(fetched, 1)))
        widest = max((4 * math.prod(s[1:]) for s in index.shapes.values()
                      if len(s) >= 2 and all(isinstance(d, int) for d in s[1:])), default=0)
        per_run = max(1, min(batch, RUN_BYTES // max(LIVE_TENSORS * widest + fetched, 1)))
    logger.info("location-aware calibration of %d probes: %s, batches of %d (%d per onnxruntime call)", len(names),
                "sampled positions gathered in the graph" if label_output is None and gather else
                f"views fetched ({len(gather)} at {candidates} candidate cells), positions gathered in numpy",
                batch, per_run or batch)
    return LocationJob(viewed.SerializeToString(), specs, views, tuple(layouts), targets, label_output, pooled, seed,
                       batch, backend, intra_op_threads, shard_batches, per_run, candidates)


def _fetched_bytes(prepared: PreparedModel, layouts: Sequence[ProbeView], label_output: str | None,
                   gather: set[str], candidates: int) -> int:
    """Bytes per sample that a batch fetches whole: the views (unless gathered) and the labelled output."""
    shapes = prepared.index.shapes
    total = 0
    for lay in layouts:
        shape = shapes.get(lay.tensor) or ()
        if prepared.index.last_axis and lay.tensor in prepared.index.last_axis and len(shape) >= 3:
            shape = (shape[0], shape[-1], *shape[1:-1])
        channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else 1
        if lay.kind == "pooled" or (lay.tensor in gather and label_output is None):
            total += 4 * channels
        elif lay.tensor in gather:
            total += 4 * channels * candidates
        else:
            total += 4 * channels * math.prod(d if isinstance(d, int) else 1 for d in lay.grid)
    if label_output is not None:
        out = next(o for o in prepared.model.graph.output if o.name == label_output)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in
                out.type.tensor_type.shape.dim]
        total += 4 * math.prod(dims[1:])
    return total
