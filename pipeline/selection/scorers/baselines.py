"""Baseline scorers: weight norms (``l1``, ``l2``), activation statistics (``mean-act``, ``apoz``) and ``random``.

Math (higher = keep):

* ``l1`` / ``l2``: for group channel ``c``, the L1 norm / L2 norm of the output-channel slices that make ``c`` in
  every producer weight (``ScoringContext.producer_weights`` names each producer's initializer, its output axis
  and the tensor whose layout maps its rows to groups: after refinement one producer makes several groups; a
  residual group sums the squared (L2) or absolute (L1) entries over all its producers, depthwise ones included).
* ``mean-act``: ``abs_sum / elements`` per channel, the mean |activation| before pooling (Molchanov et al.'s mean
  activation criterion).
* ``apoz``: ``1 − zeros / elements``, one minus the Average Percentage of Zeros (Hu et al. 2016).
  Activation scorers average over the group's probes and over copies of the group within a probe.
* ``random``: uniform scores from ``numpy.random.default_rng([seed, crc32(group id)])``, reproducible per group.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from graph_ops.groups import ChannelGroup
from pipeline.errors import UserInputError
from pipeline.selection.scorers.base import ChannelScores, ScoringContext, group_views, require_stats


def _rows(ctx: ScoringContext, group: ChannelGroup, tensor: str | None, rows: int) -> list[tuple[int, int]]:
    """(group channel, weight row) pairs of a producer whose rows are laid out like ``tensor``."""
    if tensor is None:
        return [(c, c) for c in range(min(rows, group.size))] if rows == group.size else []
    return [(seg.start + i, seg.offset + i) for seg in ctx.index.by_tensor.get(tensor, ())
            if seg.group_id == group.id for i in range(seg.length)]


def _producer_rows(ctx: ScoringContext, group: ChannelGroup, power: int) -> np.ndarray:
    total = np.zeros(group.size)
    found = 0
    for node in group.producers:
        if node not in ctx.producer_weights:
            continue
        name, axis, *layout = ctx.producer_weights[node]
        if name not in ctx.weights:
            raise UserInputError(f"weight initializer {name!r} of producer {node!r} was not given to the scorer")
        w = np.moveaxis(np.asarray(ctx.weights[name], dtype=np.float64), axis, 0)
        pairs = _rows(ctx, group, layout[0] if layout else None, w.shape[0])
        if not pairs:
            raise UserInputError(f"producer {node!r} of group {group.id} has {w.shape[0]} output channels, "
                                 f"the group has {group.size}")
        mass = (np.abs(w) ** power).reshape(w.shape[0], -1).sum(axis=1)
        channels, rows = np.array(pairs).T
        np.add.at(total, channels, mass[rows])
        found += 1
    if not found:
        raise UserInputError(f"group {group.id}: no producer weight known (ScoringContext.producer_weights must "
                             f"map its producers {group.producers} to (initializer, output axis))")
    return total if power == 1 else np.sqrt(total)


@dataclass(frozen=True)
class NormScorer:
    """``l1`` (power 1) or ``l2`` (power 2) norm of the producer weight rows."""

    name: str
    power: int
    requires_stats: bool = False
    requires_labels: bool = False

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        scores = {g.id: _producer_rows(ctx, g, self.power) for g in ctx.prunable()}
        return ChannelScores(method=self.name, params={}, scores=scores, model_sha256=ctx.model_sha256)


@dataclass(frozen=True)
class ActivationScorer:
    """``mean-act`` (mean |activation|) or ``apoz`` (1 − fraction of zeros)."""

    name: str
    requires_stats: bool = True
    requires_labels: bool = False
    requires_summaries: bool = True

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        stats = require_stats(ctx, self.name)
        scores = {}
        for group in ctx.prunable():
            per_probe = []
            for view in group_views(group, ctx.index, stats):
                if view.stats.elements == 0 and view.stats.n > 0:
                    raise UserInputError(f"method '{self.name}' needs per-channel zero counts and absolute sums, "
                                         f"which these statistics lack (calibrated with summaries=False); "
                                         f"re-run calibration with summaries")
                elements = max(view.stats.elements, 1)
                if self.name == "apoz":
                    value = 1.0 - view.stats.zeros / elements
                else:
                    value = view.stats.abs_sum / elements
                per_probe.append(value[view.channel_of].mean(axis=1))
            scores[group.id] = np.mean(per_probe, axis=0)
        return ChannelScores(method=self.name, params={}, scores=scores, model_sha256=ctx.model_sha256)


@dataclass(frozen=True)
class RandomScorer:
    """Seeded uniform scores (a control)."""

    name: str = "random"
    requires_stats: bool = False
    requires_labels: bool = False

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        scores = {g.id: np.random.default_rng([ctx.seed, zlib.crc32(g.id.encode())]).random(g.size)
                  for g in ctx.prunable()}
        return ChannelScores(method=self.name, params={"seed": float(ctx.seed)}, scores=scores,
                             model_sha256=ctx.model_sha256)
