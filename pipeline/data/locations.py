"""Locations of a probe and their labels: how dense targets meet a probe's grid, and which locations are sampled.

For dense targets (methods.md §8) a calibration sample is a *location* of a probe, not an image. This module is the
numpy side of that pairing (no onnxruntime): what grid a probe offers (:func:`view_of`), the label of every cell of it
(:func:`map_on_grid`, :func:`line_on_grid`, :func:`boxes_on_grid`), and which cells enter the statistics
(:func:`sample_cells`).

Views (the probe's tensor brought to channels-first ``(N, C, ...)`` first; ``ProbeView.kind``):

* ``grid`` ``(h, w)``: a 4-D probe ``(N, C, h, w)`` with ``h * w > 1`` for map and box targets; a cell's feature is
  the C-vector ``f(i, j)``.
* ``line`` ``(L,)``: for sequence targets (CTC: the time axis runs along the width): a 4-D probe averaged over its
  height (``mean_i f(i, j)``, column ``j``), or a 3-D probe ``(N, C, L)`` as it is.
* ``pooled``: a probe without a usable grid (``(N, C)`` vectors, ``1 x 1`` maps such as squeeze-and-excitation
  inputs, 3-D probes under map or box targets, whose length need not be a flattened ``h x w``): it sees the whole
  image, so its feature is the probe averaged over every position, and every location sampled on a *reference grid*
  (map and box targets: ``REFERENCE_GRID x REFERENCE_GRID``; sequences: the target's own time steps) pairs that one
  vector with its own label. The probe is then scored on how well its image-level features separate the classes of
  the image's locations, weighted by how many of them are sampled.

Labels on a grid (``-1`` = ignore: never sampled). The probe's grid is taken to cover the input (or the label map,
or the time axis) uniformly, as a stack of strided convolutions does, so cell ``i`` of ``n`` along an axis of length
``L`` covers the span ``[floor(i L / n), ceil((i + 1) L / n))`` (the bins of adaptive pooling; one source element
per cell when the grid is finer than the source: nearest):

* a class map (segmentation masks, a model's per-pixel decisions): the majority class of the cell's span, ignored
  pixels not counted; ties go to a non-background class, then to the smallest id; a cell whose span is all ignored is
  ignored (:func:`map_on_grid`); a class sequence over time steps: the same along one axis (:func:`line_on_grid`);
* boxes ``class, cx, cy, w, h`` (normalised to the input): a cell whose centre lies inside a box takes that box's
  class, the smallest box where boxes overlap, else the background class; a box that covers no cell centre (smaller
  than a cell) still marks the cell holding its centre, so every object is seen on every grid
  (:func:`boxes_on_grid`).

Sampling (:func:`sample_cells`, class-balanced so that time and memory stay bounded and background does not swamp
the objects): per image, every foreground class present takes ``min(count, per_class)`` of its cells, drawn uniformly;
the background takes ``min(count, ceil(background_ratio * foreground cells taken))``, or ``min(count, per_class)``
in an image without foreground. The draw uses one uniform key per cell from a generator seeded by ``(seed, sample
index, crc32 of the probe name)`` (:func:`location_rng`): it depends on the sample and the probe only, never on the
batch or shard that holds the sample, and is the same whether the gather runs inside the graph or in numpy. At most
``(classes present) * per_class * (1 + background_ratio)`` locations per image and probe enter the statistics.

Candidates (labels known only after the batch ran, i.e. the model's own decisions; grids of more than
``CANDIDATE_CELLS`` cells): only the ``CANDIDATE_CELLS`` cells with the smallest keys are fetched from onnxruntime
(:func:`candidate_cells`, known before the run since the keys do not depend on the labels), and the class-balanced
sample is drawn among them with the same keys. The result equals the sample over the whole grid whenever every class
has at least ``per_class`` cells among the candidates (its cells with the smallest keys are then all candidates);
a class with fewer contributes only those (and the background quota follows from what was taken).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserInputError

REFERENCE_GRID = 16
CANDIDATE_CELLS = 1024
DEFAULT_PER_CLASS = 16
DEFAULT_BACKGROUND_RATIO = 1.0
VIEW_KINDS = ("grid", "line", "pooled")


@dataclass(frozen=True)
class Sampling:
    """How many locations per image and class enter the statistics (module docstring)."""

    per_class: int = DEFAULT_PER_CLASS
    background_ratio: float = DEFAULT_BACKGROUND_RATIO

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise UserInputError(f"--locations-per-class must be at least 1, got {self.per_class}")
        if not (self.background_ratio >= 0 and math.isfinite(self.background_ratio)):
            raise UserInputError(f"--background-ratio must be a finite number >= 0, got {self.background_ratio}")


@dataclass(frozen=True)
class ProbeView:
    """How a probe meets the targets: ``kind`` (``grid``, ``line``, ``pooled``) and its grid (``(h, w)``, ``(L,)`` or
    ``()``; ``None`` entries: known only at run time)."""

    tensor: str
    kind: str
    grid: tuple[int | None, ...]


def view_of(tensor: str, shape: Sequence[int | None], target: str) -> ProbeView:
    """The view of a probe of channels-first ``shape`` under targets of kind ``target`` (``map``, ``boxes``,
    ``sequence``; module docstring)."""
    dims = tuple(shape[2:])
    if len(dims) == 2 and not (dims[0] == 1 and dims[1] == 1):
        if target == "sequence":
            return ProbeView(tensor, "line", (dims[1],)) if dims[1] != 1 else ProbeView(tensor, "pooled", ())
        return ProbeView(tensor, "grid", dims)
    if len(dims) == 1 and target == "sequence" and dims[0] != 1:
        return ProbeView(tensor, "line", dims)
    return ProbeView(tensor, "pooled", ())


def location_rng(seed: int, sample: int, probe: str) -> np.random.Generator:
    """The generator of one sample's draws at one probe (module docstring)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(sample), zlib.crc32(probe.encode())])


def _spans(length: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop of every cell's span along an axis (adaptive-pooling bins)."""
    i = np.arange(cells)
    return (i * length) // cells, -((-(i + 1) * length) // cells)


def _order(classes: np.ndarray, background: int | None) -> np.ndarray:
    """Classes in tie-breaking order: non-background ascending, the background last."""
    fg = classes[classes != background] if background is not None else classes
    return np.concatenate([np.sort(fg), classes[classes == background]]) if background is not None else np.sort(fg)


def _present(values: np.ndarray) -> np.ndarray:
    """The distinct non-negative values of an integer array, ascending."""
    valid = values[values >= 0]
    if not valid.size:
        return np.zeros(0, np.int64)
    top = int(valid.max())
    return np.flatnonzero(np.bincount(valid.ravel(), minlength=top + 1)) if top < 1 << 16 else np.unique(valid)


@dataclass(frozen=True)
class ClassCounts:
    """Per class present in a class map ``(H, W)``, its integral image ``(H + 1, W + 1)``, in tie-breaking order
    (non-background ascending, the background last): what :func:`map_on_grid` reads, built once per map and shared
    by every grid."""

    shape: tuple[int, int]
    classes: np.ndarray
    integrals: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, background: int | None) -> ClassCounts:
        """The counts of a class map (``-1`` ignored)."""
        lab = np.asarray(labels)
        classes = _order(_present(lab), background)
        integrals = np.zeros((len(classes), lab.shape[0] + 1, lab.shape[1] + 1), np.int32)
        for i, k in enumerate(classes):
            np.cumsum(np.cumsum(lab == k, axis=0, dtype=np.int32), axis=1, out=integrals[i, 1:, 1:])
        return cls((int(lab.shape[0]), int(lab.shape[1])), classes, integrals)


def map_on_grid(labels: np.ndarray | ClassCounts, grid: tuple[int, int], background: int | None) -> np.ndarray:
    """Majority class of every cell of an ``(h, w)`` grid over a class map ``(H, W)`` (``-1`` ignored; module
    docstring; or its :class:`ClassCounts`), as int64 ``(h, w)``."""
    counts = labels if isinstance(labels, ClassCounts) else ClassCounts.of(labels, background)
    h, w = int(grid[0]), int(grid[1])
    r0, r1 = _spans(counts.shape[0], h)
    c0, c1 = _spans(counts.shape[1], w)
    best = np.full((h, w), -1, np.int64)
    most = np.zeros((h, w), np.int64)
    for k, ii in zip(counts.classes, counts.integrals, strict=True):
        count = ii[np.ix_(r1, c1)] - ii[np.ix_(r0, c1)] - ii[np.ix_(r1, c0)] + ii[np.ix_(r0, c0)]
        better = count > most
        best[better], most[better] = k, count[better]
    return best


def line_on_grid(labels: np.ndarray, length: int, background: int | None) -> np.ndarray:
    """Majority class of every cell of a 1-D grid of ``length`` over a class sequence ``(T,)`` (``-1`` ignored)."""
    return map_on_grid(np.asarray(labels).reshape(1, -1), (1, length), background)[0]


def boxes_on_grid(boxes: np.ndarray, grid: tuple[int, int], background: int) -> np.ndarray:
    """Boxes ``(m, 5)`` rows ``class, cx, cy, w, h`` (normalised) rasterised on an ``(h, w)`` grid (module
    docstring), as int64 ``(h, w)``."""
    h, w = int(grid[0]), int(grid[1])
    out = np.full((h, w), background, np.int64)
    rows = np.asarray(boxes, np.float64).reshape(-1, 5)
    for cls, cx, cy, bw, bh in rows[np.argsort(-(rows[:, 3] * rows[:, 4]), kind="stable")]:
        # cell centres ((j + 0.5) / w, (i + 0.5) / h) inside [cx - bw / 2, cx + bw / 2] x [cy - bh / 2, cy + bh / 2]
        i0, i1 = math.ceil((cy - bh / 2) * h - 0.5), math.floor((cy + bh / 2) * h - 0.5)
        j0, j1 = math.ceil((cx - bw / 2) * w - 0.5), math.floor((cx + bw / 2) * w - 0.5)
        i0, j0, i1, j1 = max(i0, 0), max(j0, 0), min(i1, h - 1), min(j1, w - 1)
        if i0 > i1 or j0 > j1:  # smaller than a cell: the cell holding its centre
            i0 = i1 = min(max(int(cy * h), 0), h - 1)
            j0 = j1 = min(max(int(cx * w), 0), w - 1)
        out[i0:i1 + 1, j0:j1 + 1] = int(cls)
    return out


def candidate_cells(size: int, rng: np.random.Generator, count: int = CANDIDATE_CELLS) -> np.ndarray:
    """The ``count`` cells (ascending) of a grid of ``size`` cells with the smallest keys of ``rng`` (the keys
    :func:`sample_cells` draws from a generator of the same seed); every cell when there are no more."""
    keys = rng.random(size)
    return np.arange(size) if size <= count else np.sort(np.argpartition(keys, count - 1)[:count])


def sample_cells(labels: np.ndarray, rng: np.random.Generator, sampling: Sampling, background: int | None,
                 candidates: np.ndarray | None = None) -> np.ndarray:
    """Flat indices (ascending) of the cells of one image's label grid that enter the statistics (module docstring),
    among ``candidates`` when given (:func:`candidate_cells`). One uniform key per cell is drawn from ``rng``
    whatever the labels, so the draw of a cell does not depend on the other cells' classes."""
    flat = np.asarray(labels).reshape(-1)
    keys = rng.random(flat.size)
    if candidates is not None:
        restricted = np.full(flat.size, -1, np.int64)
        restricted[candidates] = flat[candidates]
        flat = restricted
    classes = _present(flat)
    chosen, taken = [], 0
    for k in classes[classes != background] if background is not None else classes:
        chosen.append(_smallest(np.flatnonzero(flat == k), keys, sampling.per_class))
        taken += len(chosen[-1])
    if background is not None and background in classes:
        allowed = math.ceil(sampling.background_ratio * taken) if taken else sampling.per_class
        chosen.append(_smallest(np.flatnonzero(flat == background), keys, allowed))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _smallest(cells: np.ndarray, keys: np.ndarray, quota: int) -> np.ndarray:
    """The ``quota`` cells of ``cells`` with the smallest keys (all of them when there are no more)."""
    if len(cells) <= quota:
        return cells
    return cells[np.argpartition(keys[cells], quota - 1)[:quota]] if quota > 0 else cells[:0]


def grid_labels(kind: str, target: str, sample: np.ndarray | ClassCounts, grid: tuple[int, ...],
                background: int | None) -> np.ndarray:
    """The labels of one sample's target on one view's grid: ``grid`` views get maps or boxes, ``line`` views
    sequences; ``pooled`` views the reference grid (``REFERENCE_GRID`` squared for maps and boxes, the target's own
    time steps for sequences). A class map may come as its :class:`ClassCounts` (built once for all grids)."""
    if kind == "pooled":
        if target == "sequence":
            return np.asarray(sample, np.int64).reshape(-1)
        grid = (REFERENCE_GRID, REFERENCE_GRID)
    elif kind == "line":
        return line_on_grid(sample, int(grid[0]), background)
    if target == "boxes":
        assert background is not None
        return boxes_on_grid(sample, (int(grid[0]), int(grid[1])), background)
    return map_on_grid(sample, (int(grid[0]), int(grid[1])), background)
