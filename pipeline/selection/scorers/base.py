"""The scorer protocol, its input (:class:`ScoringContext`), its output (:class:`ChannelScores`) and shared helpers.

A scorer maps every prunable channel group to one score per group channel (higher = keep). It may add an
elimination ``order`` (group channel indices, first removed first) and a ``retention`` curve ``r(w)`` for widths
``0..size`` (``r(size) = 1``), which the planner uses to compare groups (methods.md §1.6 ii).

How a group's features come out of a probe: for probe tensor ``p`` in ``group.probes``, every
``Segment`` of ``index.by_tensor[p]`` with ``segment.group_id == group.id`` lays group channels
``start .. start+length-1`` at tensor channels ``offset .. offset+length-1``; with ``cells`` pooled cells per
channel, tensor channel ``t`` owns features ``t*cells .. t*cells+cells-1``. :func:`group_views` returns, per probe,
the sub-statistics of exactly those features and, for each group channel, the block of local feature indices it
owns (several blocks when the group occurs more than once in the tensor).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from graph_ops.groups import ChannelGroup, ChannelGroupIndex
from graph_ops.io import read_text
from pipeline.calibration.stats import CalibrationStats, ProbeStats
from pipeline.errors import CalibrationError, UserInputError
from pipeline.model.prepare import Layer

SCORES_FORMAT = "diprune.scores/1"


def _frozen_map(items: Mapping[str, Any], dtype: Any) -> Mapping[str, np.ndarray]:
    out = {}
    for key in sorted(items):
        array = np.array(items[key], dtype=dtype, copy=True)
        array.setflags(write=False)
        out[key] = array
    return MappingProxyType(out)


@dataclass(frozen=True)
class ScoringContext:
    """Everything a scorer may read.

    Attributes:
        index: channel groups of the model.
        stats: calibration statistics (``None`` for data-free scorers).
        weights: initializer name -> array (for ``l1``/``l2``).
        params: scorer parameters (e.g. ``eps`` for DI).
        seed: seed of every random choice.
        model_sha256: identity of the scored model (copied into the scores).
        producer_weights: producer node name -> (weight initializer name, output-channel axis[, layout tensor]);
            needed by ``l1``/``l2`` (Conv: axis 0, Gemm with transB=1: axis 0, MatMul: axis 1, ConvTranspose: axis 1;
            the optional layout tensor maps the weight's rows to groups, else rows are the group's channels).
        layers: every layer that reads channels, in topological order (:class:`Layer`; for ``lda-trace``).
    """

    index: ChannelGroupIndex
    stats: CalibrationStats | None = None
    weights: Mapping[str, np.ndarray] = field(default_factory=lambda: MappingProxyType({}))
    params: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    seed: int = 0
    model_sha256: str = ""
    producer_weights: Mapping[str, tuple[str, int] | tuple[str, int, str]] = field(
        default_factory=lambda: MappingProxyType({}))
    layers: tuple[Layer, ...] = ()

    def param(self, name: str, default: float) -> float:
        """A float parameter with its default."""
        return float(self.params.get(name, default))

    def prunable(self) -> tuple[ChannelGroup, ...]:
        """Prunable groups, in index (topological) order."""
        return tuple(g for g in self.index.groups if g.prunable)


@dataclass(frozen=True)
class ChannelScores:
    """Per-group channel scores (higher = keep), optional elimination orders and retention curves."""

    method: str
    params: Mapping[str, float]
    scores: Mapping[str, np.ndarray]
    order: Mapping[str, np.ndarray] = field(default_factory=lambda: MappingProxyType({}))
    retention: Mapping[str, np.ndarray] = field(default_factory=lambda: MappingProxyType({}))
    model_sha256: str = ""
    task: Mapping[str, Any] | None = None  # the task whose head the scored model carried (pipeline.data.task)
    labels: Mapping[str, Any] | None = None  # what the statistics paired features with (pipeline.data.targets.Targets)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(sorted(self.params.items()))))
        object.__setattr__(self, "scores", _frozen_map(self.scores, np.float64))
        object.__setattr__(self, "order", _frozen_map(self.order, np.int64))
        object.__setattr__(self, "retention", _frozen_map(self.retention, np.float64))

    def elimination_order(self, group_id: str) -> np.ndarray:
        """The stored order, else channels by ascending score (ties by channel index)."""
        if group_id in self.order:
            return self.order[group_id]
        return np.argsort(self.scores[group_id], kind="stable")

    def to_json(self, model_path: str | None = None) -> str:
        """``diprune.scores/1`` JSON (floats written with full precision)."""
        groups = {}
        for gid in self.scores:
            entry: dict[str, Any] = {"scores": self.scores[gid].tolist()}
            if gid in self.order:
                entry["order"] = self.order[gid].tolist()
            if gid in self.retention:
                entry["retention"] = self.retention[gid].tolist()
            groups[gid] = entry
        doc = {"format": SCORES_FORMAT, "model_sha256": self.model_sha256, "model_path": model_path,
               "method": self.method, "params": dict(self.params), "groups": groups}
        if self.task:
            doc["task"] = dict(self.task)
        if self.labels:
            doc["labels"] = dict(self.labels)
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> tuple[ChannelScores, str | None]:
        """Parse :meth:`to_json` output; returns the scores and the recorded model path."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"scores file is not JSON: {err}") from err
        if not isinstance(doc, dict) or doc.get("format") != SCORES_FORMAT:
            raise UserInputError(f"not a DIPrune scores file (expected format {SCORES_FORMAT!r})")
        try:
            groups = doc["groups"]
            scores = cls(method=str(doc["method"]), params={k: float(v) for k, v in doc["params"].items()},
                         scores={g: e["scores"] for g, e in groups.items()},
                         order={g: e["order"] for g, e in groups.items() if "order" in e},
                         retention={g: e["retention"] for g, e in groups.items() if "retention" in e},
                         model_sha256=str(doc.get("model_sha256") or ""), task=doc.get("task"),
                         labels=doc.get("labels"))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserInputError(f"scores file has a missing or malformed field: {err!r}") from err
        return scores, doc.get("model_path")

    @classmethod
    def load(cls, path: str | Path) -> tuple[ChannelScores, str | None]:
        """Read a scores file; returns the scores and the model path recorded in it (may be ``None``)."""
        return cls.from_json(read_text(path, "scores file"))


class Scorer(Protocol):
    """A registered scoring method."""

    name: str
    requires_stats: bool
    requires_labels: bool

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group of ``ctx.index``."""


@dataclass(frozen=True)
class GroupView:
    """A group's slice of one probe: sub-statistics and, per group channel, its local feature block."""

    probe: str
    stats: ProbeStats
    blocks: np.ndarray  # (size, b) local feature indices of each group channel
    channel_of: np.ndarray  # (size, copies) local channel indices (rows of stats.zeros / abs_sum)
    features: np.ndarray  # tensor feature index of every local feature


def group_views(group: ChannelGroup, index: ChannelGroupIndex, stats: CalibrationStats) -> list[GroupView]:
    """Sub-statistics of ``group`` in each of its probes (see the module docstring)."""
    views = []
    for probe in group.probes:
        if probe not in stats.probes:
            raise CalibrationError(f"statistics have no probe {probe!r} (group {group.id}); calibrate this model")
        full = stats.probes[probe]
        per_channel: list[list[int]] = [[] for _ in range(group.size)]
        for seg in index.by_tensor.get(probe, ()):
            if seg.group_id == group.id:
                for i in range(seg.length):
                    per_channel[seg.start + i].append(seg.offset + i)
        copies = {len(c) for c in per_channel}
        if copies != {len(per_channel[0])} or not per_channel[0]:
            raise CalibrationError(f"probe {probe!r} does not hold every channel of group {group.id} equally often")
        tensor_channels = np.array(per_channel, dtype=np.int64)  # (size, copies)
        if tensor_channels.max() >= full.channels:
            raise CalibrationError(f"probe {probe!r} has {full.channels} channels, the index needs more")
        flat = tensor_channels.reshape(-1)
        cells = np.arange(full.cells)
        features = (flat[:, None] * full.cells + cells[None, :]).reshape(-1)
        sub = full.subset(features, flat)
        width = tensor_channels.shape[1] * full.cells
        blocks = np.arange(group.size * width).reshape(group.size, width)
        channel_of = np.arange(flat.size).reshape(tensor_channels.shape)
        views.append(GroupView(probe=probe, stats=sub, blocks=blocks, channel_of=channel_of, features=features))
    return views


def require_stats(ctx: ScoringContext, method: str) -> CalibrationStats:
    """The context's statistics, or a clear error naming the method."""
    if ctx.stats is None:
        raise UserInputError(f"method '{method}' needs calibration statistics; run 'diprune calibrate' first")
    return ctx.stats


def normalised_mean(per_probe: list[np.ndarray]) -> np.ndarray:
    """Mean over probes of each probe's scores divided by their sum (the default cross-probe ``reduction``)."""
    out = np.zeros_like(per_probe[0], dtype=np.float64)
    for scores in per_probe:
        total = float(np.sum(scores))
        out += scores / total if total > 0 else scores
    return out / len(per_probe)
