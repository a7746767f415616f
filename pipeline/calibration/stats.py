"""Sufficient statistics of pooled probe activations (methods.md §1.1, §2.2, §3.2).

For every probe tensor the calibration runner pools each sample's activation map to a feature vector
``x ∈ R^d`` (``d = C * cells``, channel-major: channel ``c`` owns features ``c*cells .. c*cells+cells-1``) and
accumulates, in float64::

    n, n_k (class counts), s = Σ x, s_k = Σ_{i∈k} x, G = Σ x xᵀ (uncentred), plus per channel the number of exact
    zeros and the sum of |activation| over all raw elements (before pooling).

The per-channel part of a batch is a :class:`ChannelSummary`, computed by :func:`channel_summaries` (one float64
reduction over the contiguous spatial axis, whose per-sample channel sums the caller can reuse for GAP features; a
zero count; and, only for a tensor with negative values, a second reduction of ``|a|``). ``ProbeStats.update``
takes either the raw activations or a summary made from them; both paths are this one piece of code.

Everything DI, LDA and PLS need follows exactly: ``μ = s/n``, ``μ_k = s_k/n_k``, total scatter
``S = G − n μ μᵀ``, ``D[:, k] = √n_k (μ_k − μ)``, between scatter ``S_B = D Dᵀ``, within scatter ``S − S_B``.
All fields are sums, so :meth:`ProbeStats.merge` is exact, associative and order-independent (up to float64
rounding), which lets calibration be sharded. With many classes (location-aware calibration of a CTC head over a
dictionary of thousands of characters) only the classes seen are stored: ``class_ids`` lists the classes whose rows
``class_sums`` holds (sorted; None = every class ``0..K-1``); the rows of unseen classes are zero and carry no
information (``D`` has zero columns there), so DI, LDA and PLS-VIP are the same either way. Note: the uncentred gram loses relative precision in ``S`` when
``|μ|`` is much larger than the spread of the features (near-constant channels); the DI scorer's ridge is never
below that rounding noise (:func:`pipeline.selection.scorers.di.ridge`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from graph_ops.io import atomic_write_bytes
from pipeline.errors import CalibrationError, UserInputError

STATS_FORMAT = "diprune.stats/1"
_ARRAYS = ("class_counts", "sum", "class_sums", "gram", "zeros", "abs_sum")


def _frozen(array: np.ndarray, dtype: Any) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


def channel_summaries(activation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample channel sums ``(N, C)`` (float64) and per-channel zero counts and absolute sums ``(C,)``.

    One float64 reduction over the contiguous spatial axis gives the sums (and the GAP features, sums / H W); for a
    non-negative activation (post-ReLU, the usual probe) the absolute sums are the same sums, so no extra pass.
    """
    n, c = activation.shape[:2]
    flat = activation.reshape(n, c, -1)
    sums = flat.sum(axis=2, dtype=np.float64)
    zeros = np.count_nonzero(flat == 0, axis=(0, 2))
    if flat.size and flat.min() >= 0:
        return sums, zeros, sums.sum(axis=0)
    return sums, zeros, np.abs(flat).sum(axis=2, dtype=np.float64).sum(axis=0)


@dataclass(frozen=True)
class ChannelSummary:
    """Per-channel reductions of one batch of raw activations ``(N, C, ...)``; arrays are read-only.

    Attributes:
        zeros: exact zeros per channel ``(C,)``.
        abs_sum: ``Σ |a|`` per channel ``(C,)`` (float64).
        elements: elements per channel, ``N * prod(spatial dims)``.
    """

    zeros: np.ndarray
    abs_sum: np.ndarray
    elements: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "zeros", _frozen(self.zeros, np.int64))
        object.__setattr__(self, "abs_sum", _frozen(self.abs_sum, np.float64))
        if self.zeros.ndim != 1 or self.abs_sum.shape != self.zeros.shape or self.elements < 0:
            raise CalibrationError(f"inconsistent channel summary: zeros {self.zeros.shape}, abs_sum "
                                   f"{self.abs_sum.shape}, elements {self.elements}")

    @classmethod
    def of(cls, activation: np.ndarray) -> tuple[np.ndarray, ChannelSummary]:
        """Summarise raw activations ``(N, C, ...)``; also return the per-sample channel sums ``(N, C)``."""
        a = np.asarray(activation)
        if a.ndim < 2:
            raise CalibrationError(f"raw activations of shape {a.shape} have no channel axis; expected (N, C, ...)")
        sums, zeros, abs_sum = channel_summaries(a)
        return sums, cls(zeros=zeros, abs_sum=abs_sum, elements=int(a.size // max(a.shape[1], 1)))


@dataclass(frozen=True)
class ProbeStats:
    """Sums over the samples seen at one probe tensor (see the module docstring); arrays are read-only."""

    n: int
    class_counts: np.ndarray
    sum: np.ndarray
    class_sums: np.ndarray
    gram: np.ndarray
    zeros: np.ndarray
    abs_sum: np.ndarray
    elements: int
    cells: int
    class_ids: np.ndarray | None = None  # the classes whose rows class_sums holds (sorted); None: all of them

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            dtype = np.int64 if name in ("class_counts", "zeros") else np.float64
            object.__setattr__(self, name, _frozen(getattr(self, name), dtype))
        d, k, c = self.sum.shape[0], self.class_counts.shape[0], self.zeros.shape[0]
        if self.class_ids is not None:
            object.__setattr__(self, "class_ids", _frozen(self.class_ids, np.int64))
            ids = self.class_ids
            if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= k or np.any(np.diff(ids) <= 0))):
                raise CalibrationError(f"class ids of probe statistics must be sorted, distinct and in 0..{k - 1}")
        rows = k if self.class_ids is None else self.class_ids.shape[0]
        if (self.class_sums.shape != (rows, d) or self.gram.shape != (d, d) or self.abs_sum.shape != (c,)
                or c * self.cells != d):
            raise CalibrationError(f"inconsistent probe statistics shapes: d={d}, K={k}, C={c}, cells={self.cells}, "
                                   f"class_sums {self.class_sums.shape}, gram {self.gram.shape}")

    @classmethod
    def empty(cls, channels: int, cells: int, num_classes: int) -> ProbeStats:
        """Statistics of zero samples for a probe with ``channels`` channels of ``cells`` pooled cells each."""
        d = channels * cells
        return cls(n=0, class_counts=np.zeros(num_classes), sum=np.zeros(d), class_sums=np.zeros((num_classes, d)),
                   gram=np.zeros((d, d)), zeros=np.zeros(channels), abs_sum=np.zeros(channels), elements=0,
                   cells=cells)

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.sum.shape[0])

    @property
    def channels(self) -> int:
        """Channel count ``C``."""
        return int(self.zeros.shape[0])

    @property
    def num_classes(self) -> int:
        """Class count ``K``."""
        return int(self.class_counts.shape[0])

    @property
    def rows(self) -> np.ndarray:
        """The class of every row of ``class_sums`` (``class_ids``, or ``0..K-1``)."""
        return np.arange(self.num_classes) if self.class_ids is None else self.class_ids

    @property
    def row_counts(self) -> np.ndarray:
        """Samples of the class of every row of ``class_sums``."""
        return self.class_counts[self.rows]

    def update(self, features: np.ndarray, labels: np.ndarray, raw: np.ndarray | None = None, *,
               summary: ChannelSummary | None = None) -> ProbeStats:
        """Add a batch: pooled ``features`` (n, d), integer ``labels`` (n,), and the batch's raw activations.

        Give the raw activations ``(n, C, ...)`` either as ``raw`` or already summarised as ``summary``
        (``ChannelSummary.of(raw)[1]``; the calibration runner reuses the sums it computes for pooling), or neither
        (zeros / abs_sum / elements then stay as they are).
        """
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] != y.shape[0]:
            raise CalibrationError(f"batch of features {x.shape} and labels {y.shape} does not fit a probe with "
                                   f"d={self.dim}")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise CalibrationError(f"labels must lie in 0..{self.num_classes - 1}, got {y.min()}..{y.max()}")
        if not np.isfinite(x).all():
            raise CalibrationError("pooled features contain NaN or inf; check the model and the input scaling")
        if self.class_ids is not None:  # few stored classes: fold the batch as its own statistics
            acc = ProbeAccumulator(self.channels, self.cells, self.num_classes, sparse=True)
            acc.add(x, y, self._summary(raw, summary, x.shape[0]))
            return self.merge(acc.freeze())
        onehot = np.zeros((x.shape[0], self.num_classes))
        onehot[np.arange(x.shape[0]), y] = 1.0
        summary = self._summary(raw, summary, x.shape[0])
        return ProbeStats(n=self.n + x.shape[0], class_counts=self.class_counts + onehot.sum(axis=0).astype(np.int64),
                          sum=self.sum + x.sum(axis=0), class_sums=self.class_sums + onehot.T @ x,
                          gram=self.gram + x.T @ x, zeros=self.zeros + summary.zeros,
                          abs_sum=self.abs_sum + summary.abs_sum, elements=self.elements + summary.elements,
                          cells=self.cells)

    def _summary(self, raw: np.ndarray | None, summary: ChannelSummary | None, n: int) -> ChannelSummary:
        """The batch's channel summary (from ``raw`` or as given), checked against this probe."""
        if raw is not None and summary is not None:
            raise CalibrationError("give the raw activations or their summary, not both")
        if raw is not None:
            r = np.asarray(raw)
            if r.ndim < 2 or r.shape[0] != n or r.shape[1] != self.channels:
                raise CalibrationError(f"raw activations {r.shape} do not fit {n} samples x {self.channels} channels")
            summary = ChannelSummary.of(r)[1]
        if summary is None:
            return ChannelSummary(np.zeros(self.channels), np.zeros(self.channels), 0)
        if summary.zeros.shape != (self.channels,):
            raise CalibrationError(f"channel summary of {summary.zeros.shape[0]} channels does not fit a probe "
                                   f"with {self.channels}")
        return summary

    def merge(self, other: ProbeStats) -> ProbeStats:
        """Statistics of the union of both sample sets (exact sums; associative and order-independent)."""
        if (self.dim, self.num_classes, self.channels, self.cells) != (
                other.dim, other.num_classes, other.channels, other.cells):
            raise CalibrationError(f"cannot merge probe statistics of different shapes: (d, K, C, cells) = "
                                   f"{(self.dim, self.num_classes, self.channels, self.cells)} vs "
                                   f"{(other.dim, other.num_classes, other.channels, other.cells)}")
        ids, class_sums = self.class_ids, None
        if self.class_ids is None and other.class_ids is None:
            class_sums = self.class_sums + other.class_sums
        else:
            ids = np.union1d(self.rows, other.rows)
            class_sums = np.zeros((ids.size, self.dim))
            class_sums[np.searchsorted(ids, self.rows)] += self.class_sums
            class_sums[np.searchsorted(ids, other.rows)] += other.class_sums
        return ProbeStats(n=self.n + other.n, class_counts=self.class_counts + other.class_counts,
                          sum=self.sum + other.sum, class_sums=class_sums,
                          gram=self.gram + other.gram, zeros=self.zeros + other.zeros,
                          abs_sum=self.abs_sum + other.abs_sum, elements=self.elements + other.elements,
                          cells=self.cells, class_ids=ids)

    def _need_samples(self) -> None:
        if self.n == 0:
            raise CalibrationError("probe statistics hold no samples; run calibration on a non-empty data set")

    def mean(self) -> np.ndarray:
        """Global mean ``μ`` (d,)."""
        self._need_samples()
        return self.sum / self.n

    def scatter(self) -> np.ndarray:
        """Centred total scatter ``S = G − n μ μᵀ`` (d, d), symmetrised."""
        mu = self.mean()
        s = self.gram - self.n * np.outer(mu, mu)
        return (s + s.T) / 2.0

    def delta(self) -> np.ndarray:
        """``D`` (d, K): column ``k`` is ``√n_k (μ_k − μ)`` (zero for empty classes); with ``class_ids``, the columns
        of the stored classes only (the others are zero)."""
        mu = self.mean()
        counts = self.row_counts.astype(np.float64)
        safe = np.where(counts > 0, counts, 1.0)
        centred = self.class_sums / safe[:, None] - mu[None, :]
        return (centred * np.sqrt(counts)[:, None]).T

    def between(self) -> np.ndarray:
        """Between-class scatter ``S_B = Σ_k n_k (μ_k − μ)(μ_k − μ)ᵀ = D Dᵀ`` (d, d)."""
        d = self.delta()
        return d @ d.T

    def within(self) -> np.ndarray:
        """Within-class scatter ``S − S_B`` (d, d)."""
        return self.scatter() - self.between()

    def subset(self, features: np.ndarray, channels: np.ndarray) -> ProbeStats:
        """Statistics restricted to the given feature indices and (for zeros/abs_sum) tensor channels."""
        f = np.asarray(features, dtype=np.int64)
        c = np.asarray(channels, dtype=np.int64)
        cells = len(f) // max(len(c), 1)
        return ProbeStats(n=self.n, class_counts=self.class_counts, sum=self.sum[f], class_sums=self.class_sums[:, f],
                          gram=self.gram[np.ix_(f, f)], zeros=self.zeros[c], abs_sum=self.abs_sum[c],
                          elements=self.elements, cells=cells, class_ids=self.class_ids)


class ProbeAccumulator:
    """Mutable running sums of one probe, folded in place batch after batch (what calibration streams into);
    :meth:`freeze` returns the read-only :class:`ProbeStats`. Same sums as :meth:`ProbeStats.update`, without
    copying the ``d x d`` Gram matrix at every batch; feature rows are buffered and folded into the Gram matrix
    ``block_rows`` at a time (one ``X^T X`` of 512 rows is several times faster than eight of 64). ``sparse``:
    per-class sums only for the classes seen (``ProbeStats.class_ids``), for heads of thousands of classes."""

    def __init__(self, channels: int, cells: int, num_classes: int, block_rows: int = 512, *,
                 sparse: bool = False) -> None:
        """Zero sums for a probe of ``channels`` channels with ``cells`` pooled cells each and ``num_classes``."""
        d = channels * cells
        self.channels, self.cells, self.n, self.elements, self.block_rows = channels, cells, 0, 0, block_rows
        self.class_counts = np.zeros(num_classes, np.int64)
        self.sum, self.gram = np.zeros(d), np.zeros((d, d))
        self.class_sums = np.zeros((0 if sparse else num_classes, d))
        self.slots: dict[int, int] | None = {} if sparse else None  # sparse: class -> row of class_sums
        self.zeros, self.abs_sum = np.zeros(channels, np.int64), np.zeros(channels)
        self.pending: list[np.ndarray] = []

    def add(self, features: np.ndarray, labels: np.ndarray, summary: ChannelSummary | None = None,
            weights: np.ndarray | None = None) -> None:
        """Fold one batch of pooled ``features`` (n, d) with integer ``labels`` (n,) and an optional summary;
        ``weights`` (n,) positive integers: row ``i`` counts as ``weights[i]`` samples (one vector paired with
        several labels of the same class)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
        w = None if weights is None else np.asarray(weights, np.int64).reshape(-1)
        if w is not None and (w.shape != y.shape or (w.size and w.min() < 1)):
            raise CalibrationError(f"weights {w.shape} must be positive integers, one per row")
        k = self.class_counts.shape[0]
        if x.ndim != 2 or x.shape[1] != self.sum.shape[0] or x.shape[0] != y.shape[0]:
            raise CalibrationError(f"batch of features {x.shape} and labels {y.shape} does not fit a probe with "
                                   f"d={self.sum.shape[0]}")
        if y.size and (y.min() < 0 or y.max() >= k):
            raise CalibrationError(f"labels must lie in 0..{k - 1}, got {y.min()}..{y.max()}")
        if not np.isfinite(x).all():
            raise CalibrationError("pooled features contain NaN or inf; check the model and the input scaling")
        present, slot = np.unique(y, return_inverse=True)
        onehot = np.zeros((x.shape[0], present.size))
        onehot[np.arange(x.shape[0]), slot] = 1.0 if w is None else w
        self.n += x.shape[0] if w is None else int(w.sum())
        self.class_counts += np.bincount(y, minlength=k) if w is None else np.bincount(y, w, k).astype(np.int64)
        self.sum += x.sum(axis=0) if w is None else w @ x
        rows = self._rows(present)  # first: a sparse accumulator may grow class_sums
        self.class_sums[rows] += onehot.T @ x
        self.pending.append(x if w is None else x * np.sqrt(w)[:, None])
        if sum(len(p) for p in self.pending) >= self.block_rows:
            self._flush()
        if summary is not None:
            if summary.zeros.shape != (self.channels,):
                raise CalibrationError(f"channel summary of {summary.zeros.shape[0]} channels does not fit a probe "
                                       f"with {self.channels}")
            self.zeros += summary.zeros
            self.abs_sum += summary.abs_sum
            self.elements += summary.elements

    def _rows(self, present: np.ndarray) -> np.ndarray:
        """Rows of ``class_sums`` of the classes ``present`` (sparse: new classes get new rows)."""
        if self.slots is None:
            return present
        for c in present:
            self.slots.setdefault(int(c), len(self.slots))
        if len(self.slots) > self.class_sums.shape[0]:  # grow geometrically (amortised copies)
            grown = np.zeros((max(len(self.slots), 2 * self.class_sums.shape[0]), self.class_sums.shape[1]))
            grown[:self.class_sums.shape[0]] = self.class_sums
            self.class_sums = grown
        return np.asarray([self.slots[int(c)] for c in present], np.int64)

    def _flush(self) -> None:
        if self.pending:
            rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.gram += rows.T @ rows
            self.pending = []

    def freeze(self) -> ProbeStats:
        """The statistics accumulated so far."""
        self._flush()
        ids, class_sums = None, self.class_sums
        if self.slots is not None:
            ids = np.asarray(sorted(self.slots), np.int64)
            class_sums = self.class_sums[[self.slots[int(c)] for c in ids]].reshape(len(ids), -1)
        return ProbeStats(n=self.n, class_counts=self.class_counts, sum=self.sum, class_sums=class_sums,
                          gram=self.gram, zeros=self.zeros, abs_sum=self.abs_sum, elements=self.elements,
                          cells=self.cells, class_ids=ids)


def merge_probes(total: Mapping[str, ProbeStats], part: Mapping[str, ProbeStats]) -> dict[str, ProbeStats]:
    """Per-probe merge of two shards' statistics (``total`` first: the merge order is part of the result)."""
    return {name: stats.merge(part[name]) for name, stats in total.items()}


@dataclass(frozen=True)
class CalibrationStats:
    """Per-probe statistics of one model on one labelled data set."""

    model_sha256: str
    dataset: str
    pooling: str
    num_classes: int
    probes: Mapping[str, ProbeStats] = field(default_factory=lambda: MappingProxyType({}))
    task: Mapping[str, Any] | None = None  # the task whose head the model carried (pipeline.data.task.Task.to_dict)
    targets: Mapping[str, Any] | None = None  # what the features were paired with (pipeline.data.targets.Targets)

    def __post_init__(self) -> None:
        object.__setattr__(self, "probes", MappingProxyType(dict(sorted(self.probes.items()))))

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics of both sample sets (same model, pooling, classes, probes and targets)."""
        mine = (self.model_sha256, self.pooling, self.num_classes, tuple(self.probes), self.task, self.targets)
        theirs = (other.model_sha256, other.pooling, other.num_classes, tuple(other.probes), other.task,
                  other.targets)
        if mine != theirs:
            raise CalibrationError("cannot merge statistics of different models, poolings, classes or probes: "
                                   f"{mine[:3]} vs {theirs[:3]}")
        dataset = self.dataset if self.dataset == other.dataset else f"{self.dataset} + {other.dataset}"
        merged = {name: stats.merge(other.probes[name]) for name, stats in self.probes.items()}
        return CalibrationStats(self.model_sha256, dataset, self.pooling, self.num_classes, merged, self.task,
                                self.targets)

    def _header(self) -> dict[str, Any]:
        return {"format": STATS_FORMAT, "model_sha256": self.model_sha256, "dataset": self.dataset,
                "pooling": self.pooling, "num_classes": self.num_classes,
                "probes": [{"name": name, "n": p.n, "elements": p.elements, "cells": p.cells,
                            "pooling": "gap" if p.cells == 1 else f"avg{round(p.cells ** 0.5)}",
                            **({"sparse_classes": True} if p.class_ids is not None else {})}
                           for name, p in self.probes.items()], **({"task": dict(self.task)} if self.task else {}),
                **({"targets": dict(self.targets)} if self.targets else {})}

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (arrays ``p<i>.<field>``, JSON header in ``__header__``), atomically."""
        arrays: dict[str, np.ndarray] = {"__header__": np.array(json.dumps(self._header()))}
        for i, stats in enumerate(self.probes.values()):
            arrays.update({f"p{i}.{name}": np.asarray(getattr(stats, name)) for name in _ARRAYS})
            if stats.class_ids is not None:
                arrays[f"p{i}.class_ids"] = np.asarray(stats.class_ids)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read a file written by :meth:`save`; a missing, foreign or corrupt file raises UserInputError."""
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["__header__"]))
                if header.get("format") != STATS_FORMAT:
                    raise UserInputError(f"{path} is not a DIPrune statistics file (format "
                                         f"{header.get('format')!r}, expected {STATS_FORMAT!r})")
                probes = {entry["name"]: ProbeStats(
                    n=int(entry["n"]), elements=int(entry["elements"]), cells=int(entry["cells"]),
                    class_ids=data[f"p{i}.class_ids"] if entry.get("sparse_classes") else None,
                    **{name: data[f"p{i}.{name}"] for name in _ARRAYS}) for i, entry in enumerate(header["probes"])}
            return cls(model_sha256=str(header["model_sha256"]), dataset=str(header["dataset"]),
                       pooling=str(header["pooling"]), num_classes=int(header["num_classes"]), probes=probes,
                       task=header.get("task"), targets=header.get("targets"))
        except UserInputError:
            raise
        except Exception as err:  # zipfile, KeyError, JSON and value errors all mean a corrupt file
            raise UserInputError(f"{path} is not a readable DIPrune statistics file (corrupt or truncated; "
                                 f"re-run 'diprune calibrate'): {err!r}") from err
