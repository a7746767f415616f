"""The widths a channel group may take, and which groups the planner protects.

A group's *ladder* (:func:`_ladder`) holds its widths ``size > w_1 > ... >= w_min`` in steps of ``round_to`` (of
``lcm(round_to, G)`` for a group in ``G`` blocks); a measured allocation measures a group at its
:func:`anchor_widths` and interpolates between them with :func:`measured_curve`; channels leave a block group
block-fairly (:func:`block_order`). The rules are those of :mod:`pipeline.selection.allocate`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from graph_ops.groups import ChannelGroupIndex
from pipeline.errors import UserInputError

ANCHORS = (0.75, 0.5, 0.25)
"""Measured allocation: the shares of a group's width measured (on its ladder), besides its floor."""


_TIE = 1e-9


def _ladder(size: int, round_to: int, min_channels: int, blocks: int = 1) -> list[int]:
    """Allowed widths of one group, from ``size`` down (see the module docstring)."""
    step = math.lcm(max(round_to, 1), blocks)
    floor_width = max(step, math.ceil(max(min_channels, 1) / step) * step)
    widths = [size]
    width = (size // step) * step
    if width == size:
        width -= step
    while width >= floor_width:
        widths.append(width)
        width -= step
    return widths


def anchor_widths(size: int, round_to: int, min_channels: int, blocks: int = 1) -> tuple[int, ...]:
    """The widths a measured allocation measures a group at: the rungs of its ladder nearest to :data:`ANCHORS` of
    its size, and the lowest rung of its finest ladder (``round_to // 2`` steps, see ``fine_share``); descending."""
    ladder = _ladder(size, round_to, min_channels, blocks)[1:]
    fine = _ladder(size, max(round_to // 2, 1), min_channels, blocks)[1:]
    if not ladder and not fine:
        return ()
    picks = {min(ladder, key=lambda w: (abs(w - share * size), w)) for share in ANCHORS if ladder}
    picks |= {min([*ladder, *fine])}
    return tuple(sorted(picks, reverse=True))


def measured_curve(criterion: np.ndarray, widths: tuple[int, ...], damage: tuple[float, ...],
                   collapse: float) -> np.ndarray:
    """A group's measured damage at every width ``0..size``: the measured points (with ``D(size) = 0``), linear in
    the criterion's own curve (``criterion``, :meth:`_Allocation.criterion`) between them (linear in the width where
    the criterion is flat), continued below the narrowest point at its last slope per channel; plus a tie-breaker
    of ``1e-9 * collapse`` times the criterion, and non-decreasing as the width falls."""
    size = len(criterion) - 1
    if not widths:
        return np.maximum.accumulate((_TIE * collapse * criterion)[::-1])[::-1]
    xs, ys = [size, *widths], [0.0, *damage]
    curve = np.zeros(size + 1)
    for w in range(size + 1):
        if w >= xs[-1]:
            i = next(j for j in range(len(xs) - 1) if xs[j + 1] <= w)
            hi, lo = xs[i], xs[i + 1]
            span = criterion[lo] - criterion[hi]
            t = (criterion[w] - criterion[hi]) / span if span > 0 else (hi - w) / (hi - lo)
            curve[w] = ys[i] + t * (ys[i + 1] - ys[i])
        else:
            slope = (ys[-1] - ys[-2]) / (xs[-2] - xs[-1])
            curve[w] = ys[-1] + (xs[-1] - w) * slope
    curve = curve + _TIE * collapse * criterion
    return np.maximum.accumulate(curve[::-1])[::-1]


def default_protected(index: ChannelGroupIndex) -> dict[str, str]:
    """Groups protected by default (``keep_first_and_last``), with the reason: ``"first layer"`` for a group produced
    from a graph input, ``"classifier input"`` for a group read by the last Gemm/MatMul."""
    inputs = {g.id for g in index.groups if not g.producers}  # graph inputs (frozen groups without producers)
    # only a producer that really reads a graph input is a first layer; an input without a channel layout (e.g.
    # after a channel shuffle) says nothing about depth
    reads_input = {t.node: t for t in index.cost if t.in_groups and set(t.in_groups) <= inputs}
    out: dict[str, str] = {}
    for group in index.groups:
        readers = [reads_input[p] for p in group.producers if p in reads_input]
        # a depthwise producer (in_fixed 1) of a group that has another producer only passes channels through
        if any(t.in_fixed != 1 or len(group.producers) == 1 for t in readers):
            out[group.id] = "first layer"
    classifier = [t for t in index.cost if t.op_type in ("Gemm", "MatMul")]
    if classifier:
        out.update(dict.fromkeys(classifier[-1].in_groups, "classifier input"))
    return {gid: out[gid] for gid in sorted(out)}


def _ends(index: ChannelGroupIndex) -> set[str]:
    """Groups produced from a graph input, and groups read by the last Gemm/MatMul."""
    return set(default_protected(index))


def _check_protect(index: ChannelGroupIndex, protect: Iterable[str]) -> set[str]:
    """The ``protect`` ids, each checked to be a group of the model (a typo would silently protect nothing)."""
    ids = {g.id for g in index.groups}
    unknown = sorted(set(protect) - ids)
    if unknown:
        known = ", ".join(sorted(g.id for g in index.groups if g.prunable)) or "(none)"
        raise UserInputError(f"unknown group id(s) to protect: {', '.join(unknown)}; the model's prunable groups "
                             f"are {known} (ids from 'diprune inspect')")
    return set(protect)


def block_order(order: np.ndarray, blocks: int) -> np.ndarray:
    """An elimination order in which every prefix of ``blocks * r`` channels holds exactly ``r`` of each of the
    ``blocks`` equal blocks: round ``r`` takes, in ``order``'s sequence, the ``r``-th channel of each block to leave
    (an order that already respects the blocks, such as DI's with ``blocks``, is returned unchanged)."""
    if blocks <= 1:
        return order
    per = len(order) // blocks
    rank_in_block = np.empty(len(order), dtype=np.int64)
    seen = np.zeros(blocks, dtype=np.int64)
    for channel in order:
        rank_in_block[channel] = seen[channel // per]
        seen[channel // per] += 1
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return np.asarray(sorted(order, key=lambda c: (rank_in_block[c], position[c])), dtype=np.int64)
