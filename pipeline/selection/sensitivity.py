"""Measured sensitivity of channel groups: how much the model's outputs change when one group loses channels.

The planner's global order needs the information a step loses to be comparable between groups. A criterion's own
numbers are not (raw weight norms of different layers, a DI retention of features of different dimension), so the
planner lets the criterion rank channels *inside* a group and this measurement rank the *groups*:

For every movable group ``g`` and a few widths ``a_1 > a_2 > ...`` on its ladder (:func:`pipeline.selection.widths.anchor_widths`:
about 3/4, 1/2 and 1/4 of the group, and its floor), the ``size - a`` channels that the criterion removes first (its
elimination order, block-fair for a group in blocks) are masked (``graph_ops.mask.zero_channels``: the exit weights
that read them zeroed, which computes what the surgery computes), one group at a time, and the masked model runs
on a small fixed subset of the calibration data (its first :data:`SAMPLES` samples). The damage ``D_g(a)``:

* classifier (first output of rank 2, ``(N, K)``): the mean over the samples of ``KL(p || q)``, ``p`` and ``q``
  the original and the masked model's class probabilities (the softmax of the outputs, or the outputs themselves
  when they already are probabilities: non-negative rows that sum to 1);
* a model that decides a class at every time step or pixel (first output a CTC-style sequence ``(N, T, K)`` or a
  map ``(N, K, H, W)``, :func:`pipeline.data.outputs.detect_output_kind`): the same mean ``KL(p || q)`` over every
  (sample, position) row, the class axis last for sequences, axis 1 for maps; a one-channel map is a probability
  map (the sigmoid of the outputs unless they already lie in [0, 1]) and its rows are ``(y, 1 - y)``. Raw output
  error would weigh large logits of classes nobody decides by as much as the decided class;
* any other model (a detector's boxes, regression outputs): ``sum_o ||y_o - y'_o||^2 / sum_o ||y_o - mean(y_o)||^2``
  over its outputs ``o`` (the squared error relative to the outputs' variation over the subset).

``collapse`` is the damage of a model that ignores its input: ``mean KL(p || p_mean)`` (``p_mean`` the subset's mean
prediction), resp. 1. ``D_g(size) = 0``, and ``D_g`` is made non-decreasing as the width falls (running maximum).
No recovery runs here: the damage is that of removing the channels alone. Cost: one onnxruntime pass of the
original and one of a masked model per anchor, each over the subset (recorded: ``passes``, ``seconds``).
Deterministic (fixed subset, the scores' order, onnxruntime on CPU).

Cost cap (:func:`fit_budget`): ``passes x samples`` (sample-inferences) may not exceed the calibration data's size,
so the measurement costs at most about one plain inference pass over the calibration data. When all anchors at
:data:`SAMPLES` samples do not fit, each group keeps two anchors (the one nearest half its size and its narrowest;
the curve between them follows the criterion, :func:`pipeline.selection.widths.measured_curve`) and the samples per pass shrink
to what the budget allows, down to :data:`MIN_SAMPLES`. When even that does not fit (many groups, little data) the
budget stretches to :data:`STRETCH` passes over the calibration data (two anchors, as many samples as that allows,
at least :data:`MIN_SAMPLES`): on PaddleOCR's text-direction classifier with 400 calibration lines the rule it
replaced lost 5 more points at 0.5 of the MACs than this measurement, which cost about a sixth of the lstsq recovery
(``benchmarks/results/allocation.md``); a model that fitted one pass is measured as before. Only when the stretched
budget does not fit either (e.g. ResNet-50 on 256 images) nothing is measured and the planner uses the rule (the
plan's ``meta.allocation`` says why).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx

from pipeline.errors import UserInputError
from pipeline.selection.scorers.base import ChannelScores

logger = logging.getLogger(__name__)

SAMPLES = 64
"""Calibration samples the damage is measured on (the first ones of the calibration data)."""
MIN_SAMPLES = 16
"""Fewest samples a damage is measured on (below it the cost cap falls back to the rule)."""
STRETCH = 2
"""Passes over the calibration data the measurement may cost when one pass cannot afford two anchors per group at
:data:`MIN_SAMPLES` samples (module docstring)."""
_PROB_TOL = 1e-3
_EPS = 1e-12


@dataclass(frozen=True)
class Sensitivity:
    """Measured damage per group at anchor widths (see the module docstring)."""

    metric: str  # "kl" or "relative-error"
    collapse: float
    widths: Mapping[str, tuple[int, ...]]
    damage: Mapping[str, tuple[float, ...]]
    samples: int
    passes: int
    seconds: float
    method: str = ""
    sizes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", MappingProxyType({k: tuple(int(w) for w in v)
                                                             for k, v in sorted(self.widths.items())}))
        object.__setattr__(self, "damage", MappingProxyType({k: tuple(float(d) for d in v)
                                                             for k, v in sorted(self.damage.items())}))
        object.__setattr__(self, "sizes", MappingProxyType(dict(sorted(self.sizes.items()))))

    def to_dict(self) -> dict[str, Any]:
        """What the plan's ``meta["allocation"]`` records: the metric, its cost in passes and every measured point
        (not the seconds, which the report's ``timings_s.sensitivity`` has: a plan file is deterministic)."""
        return {"metric": self.metric, "collapse": round(self.collapse, 6), "samples": self.samples,
                "passes": self.passes, "method": self.method,
                "groups": {gid: {"size": self.sizes.get(gid), "widths": list(self.widths[gid]),
                                 "damage": [round(d, 6) for d in self.damage[gid]]} for gid in self.widths}}


def fit_budget(anchors: Mapping[str, tuple[int, ...]], available: int, *, samples: int = SAMPLES,
               min_samples: int = MIN_SAMPLES, budget: int | None = None) -> tuple[dict[str, tuple[int, ...]], int] | None:
    """The anchors and samples per pass a measurement within ``budget`` sample-inferences uses (module docstring;
    default budget: ``available``, the calibration samples), or None when even two anchors per group at
    ``min_samples`` samples do not fit in :data:`STRETCH` times the budget.

    >>> fit_budget({"a": (48, 32, 16, 8), "b": (24, 16, 8)}, 2000)
    ({'a': (48, 32, 16, 8), 'b': (24, 16, 8)}, 64)
    >>> fit_budget({"a": (48, 32, 16, 8), "b": (24, 16, 8)}, 200)
    ({'a': (32, 8), 'b': (16, 8)}, 40)
    >>> fit_budget({"a": (48, 32, 16, 8), "b": (24, 16, 8)}, 40)
    ({'a': (32, 8), 'b': (16, 8)}, 16)
    >>> fit_budget({"a": (48, 32, 16, 8), "b": (24, 16, 8)}, 30) is None
    True
    """
    budget = available if budget is None else budget
    samples = min(samples, available)

    def passes(chosen: Mapping[str, tuple[int, ...]]) -> int:
        return 1 + sum(len(v) for v in chosen.values())

    if passes(anchors) * samples <= budget:
        return dict(anchors), samples
    two = {gid: tuple(sorted({v[min(1, len(v) - 1)], v[-1]}, reverse=True)) if v else () for gid, v in anchors.items()}
    fitted = min(samples, budget // passes(two))
    if fitted < min(min_samples, samples):  # small data: up to STRETCH passes (module docstring)
        fitted = min(samples, STRETCH * budget // passes(two))
    if fitted < min(min_samples, samples) or fitted < 1:
        return None
    return two, fitted


def _probabilities(outputs: np.ndarray) -> np.ndarray:
    """Class probabilities of a rank-2 output: the output itself when its rows already are probabilities, else
    its softmax (float64)."""
    y = np.asarray(outputs, dtype=np.float64)
    if y.min() >= 0 and np.allclose(y.sum(axis=1), 1.0, atol=_PROB_TOL):
        return y
    z = np.exp(y - y.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of ``KL(p || q)``."""
    return float(np.mean(np.sum(p * (np.log(np.maximum(p, _EPS)) - np.log(np.maximum(q, _EPS))), axis=1)))


@dataclass(frozen=True)
class _Reference:
    """The original model's outputs on the subset, and how damage is measured against them."""

    kind: str | None  # what the first output decides (``classes``, ``sequence``, ``map``), None: output error
    outputs: tuple[np.ndarray, ...]
    probabilities: np.ndarray | None
    variation: float

    def damage(self, outputs: list[np.ndarray]) -> float:
        if self.kind is not None:
            return _kl(self.probabilities, _decision_rows(outputs[0], self.kind))
        diff = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in zip(outputs, self.outputs,
                                                                                   strict=True))
        return diff / self.variation if self.variation > 0 else diff

    def collapse(self) -> float:
        if self.kind is None:
            return 1.0
        return _kl(self.probabilities, np.broadcast_to(self.probabilities.mean(axis=0), self.probabilities.shape))


def _decision_rows(output: np.ndarray, kind: str) -> np.ndarray:
    """The class probabilities of every decision of a first output of ``kind`` (module docstring), one row each."""
    y = np.asarray(output, dtype=np.float64)
    if kind == "sequence":
        return _probabilities(y.reshape(-1, y.shape[-1]))
    if kind == "map":
        if y.shape[1] == 1:
            p = y if (y.min() >= 0 and y.max() <= 1) else 1.0 / (1.0 + np.exp(-y))
            p = p.reshape(-1, 1)
            return np.concatenate([p, 1.0 - p], axis=1)
        return _probabilities(np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]))
    return _probabilities(y)


def _decisions_kind(model: onnx.ModelProto) -> str | None:
    """``classes``, ``sequence`` or ``map`` when the first output decides classes (KL damage), else None."""
    from pipeline.data.outputs import detect_output_kind

    try:
        kind = detect_output_kind(model)  # rank 2 is "classes" (pipeline.evaluation.evaluate.is_classifier's test)
    except UserInputError:
        return None
    return kind if kind in ("classes", "sequence", "map") else None


def _reference(outputs: list[np.ndarray], kind: str | None) -> _Reference:
    outs = tuple(np.asarray(o, np.float64) for o in outputs)
    variation = sum(float(np.sum((o - o.mean(axis=0)) ** 2)) for o in outs)
    return _Reference(kind, outs, None if kind is None else _decision_rows(outs[0], kind), variation)


def _run_subset(model: onnx.ModelProto, data: Any, backend: str, threads: int | None) -> list[np.ndarray]:
    """Every output of ``model`` on ``data`` (the whole subset), concatenated over its batches."""
    from pipeline.model.runtime import model_input_specs, open_session, samples_per_run, stream

    session = open_session(model.SerializeToString(), backend, threads)
    specs = model_input_specs(model)
    per_run = samples_per_run(model, data.num_samples)
    parts = [batch.outputs for batch in stream(session, data, None, specs, batch_size=data.num_samples,
                                               stage="sensitivity", per_run=per_run)]
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


def measure(model: onnx.ModelProto, index: Any, scores: ChannelScores, groups: Iterable[Any],
            anchors: Mapping[str, tuple[int, ...]], data: Any, *, orders: Mapping[str, np.ndarray] | None = None,
            samples: int = SAMPLES, backend: str = "auto", intra_op_threads: int | None = None) -> Sensitivity:
    """The damage of every group at its anchor widths (module docstring).

    Args:
        model: the prepared (canonical) model ``index`` was computed from.
        index: its channel groups.
        scores: the criterion whose elimination order removes the channels.
        groups: the groups to measure (:class:`graph_ops.groups.ChannelGroup`).
        anchors: group id -> widths to measure it at (descending, below its size).
        data: calibration data; its first ``samples`` samples are used.
        orders: group id -> the order channels leave in (the planner's, block-fair: ``pipeline.selection.widths.block_order``);
            default the scores' elimination order.

    Raises:
        UserInputError: no data.
    """
    from graph_ops.mask import zero_channels

    if data is None:
        raise UserInputError("a measured allocation needs calibration data: pass --data (or --allocation rule)")
    start = time.perf_counter()
    subset = data.subset(0, min(samples, data.num_samples))
    reference = _reference(_run_subset(model, subset, backend, intra_op_threads), _decisions_kind(model))
    passes = 1
    widths: dict[str, tuple[int, ...]] = {}
    damage: dict[str, tuple[float, ...]] = {}
    sizes: dict[str, int] = {}
    for group in sorted(groups, key=lambda g: g.id):
        order = (orders or {}).get(group.id)
        order = scores.elimination_order(group.id) if order is None else order
        points = tuple(w for w in anchors.get(group.id, ()) if 0 < w < group.size)
        values = []
        for width in points:
            keep = {group.id: tuple(sorted(int(c) for c in order[group.size - width:]))}
            masked = zero_channels(model, index, keep)
            values.append(reference.damage(_run_subset(masked, subset, backend, intra_op_threads)))
            passes += 1
        widths[group.id], damage[group.id], sizes[group.id] = points, tuple(np.maximum.accumulate(values)) if \
            values else (), group.size
    seconds = time.perf_counter() - start
    logger.info("sensitivity: %d groups, %d passes over %d samples, %.2f s", len(widths), passes,
                subset.num_samples, seconds)
    return Sensitivity(metric="relative-error" if reference.kind is None else "kl" if reference.kind == "classes"
                       else f"kl per {'time step' if reference.kind == 'sequence' else 'pixel'}", collapse=reference.collapse(),
                       widths=widths, damage=damage, samples=subset.num_samples, passes=passes, seconds=seconds,
                       method=scores.method, sizes=sizes)
