"""The global budget allocation that makes a pruning plan (:func:`select_channels`).

Allocation (methods.md §1.6 ii, greedy, no accuracy evaluation). Every prunable group ``g`` (not frozen, not
protected, and - with ``keep_first_and_last`` - not produced by a node reading a graph input, nor read by the last
Gemm/MatMul) has a ladder of widths ``size > w_1 > w_2 > ... >= w_min``: ``w_1`` is ``size`` rounded down to a
multiple of ``round_to`` (the first step is shorter when ``size`` is not a multiple), later rungs are multiples of
``round_to``, and ``w_min`` is the smallest multiple of ``round_to`` that is ``>= min_channels``. A step moves one
group one rung down; its information loss is

* with a retention curve (DI): ``log r(w) − log r(w')`` (``r`` floored at 1e-12);
* otherwise: the score mass of the channels removed (lowest scores first) over the group's total score mass,

and its saving is the predicted cost drop (``ChannelGroupIndex.predict``, the bilinear ``CostTerm`` model, so a
group's saving includes the shrunken inputs of its consumers). Each step takes the smallest ``loss / saving``
(ties: group id), until the predicted MACs (and/or params) fraction is ``<=`` the target. When one or more
single steps would meet the target, the finishing step is the one of them with the least loss (not the best
ratio), which avoids a large overshoot from a cheap-per-MAC but big step. The greedy stops at the first step that
crosses the target, so the result is within one step of it. Then the *fill-back* moves groups back up one rung, the
one that regains the most information first, as long as the budget still holds (``meta["filled_back"]`` steps), so
the achieved fraction ends as close to the target as the widths allow, never above it. A group whose single
``round_to`` step would cost more than ``FINE_SHARE`` (10 %) of the model's MACs (or params) steps by
``round_to / 2`` instead (``meta["fine_steps"]`` and a note say so; no finer, since widths that are not multiples of
4 cost 25-35 % more per MAC on onnxruntime CPU), e.g. the wide last conv of a small classifier that holds most of the
MACs. When no group can move any more first, the plan is returned with ``meta["reached"] = False`` and a note that
names what blocked each group (frozen, protected by default or by ``protect``, too narrow for
``round_to``/``min_channels``, at its minimum). ``protect`` ids must be groups of the model.

A group in ``G`` equal blocks (a grouped convolution reads or writes it, ``ChannelGroup.blocks``) steps in
multiples of ``lcm(round_to, G)`` and loses channels block-fairly (:func:`block_order`: the same number from each
block, each block's lowest-scored first), so the pruned convolution keeps ``G`` groups. A MACs budget needs every
Conv / Gemm cost to be known: a dynamic spatial size (``ChannelGroupIndex.unknown_macs``) is refused, naming
``--input-shape``.

Measured allocation (``sensitivity``, :mod:`pipeline.selection.sensitivity`; the default of ``prune``). A criterion's own
numbers are not comparable between groups (raw weight norms of different layers; DI of features of different
dimension). With a measurement, the loss of a step is the *measured* output damage it adds: ``D_g(w') - D_g(w)``,
``D_g`` the damage of group ``g`` alone at width ``w`` (measured at a few :func:`anchor_widths`, 0 at full width;
between them linear in the criterion's own lost share ``c_g(w)`` - ``1 - r(w)`` for DI, the removed score mass
otherwise - so the criterion orders channels inside a group and shapes its curve, the measurement ranks groups;
below the last point at its slope per channel; :func:`measured_curve`). The ends are measured like any group
(``keep_first_and_last`` is not used), and each ladder stops at the narrowest width whose damage is at most
:data:`FLOOR_SHARE` of the damage of a model that ignores its input; when the budget cannot be met with those floors
the allocation is redone without them (``meta["allocation"]["floors_relaxed"]``). ``meta["allocation"]`` records
every measured point, the floors and the widths the two ends received.

"First layer" is detected from the cost model: a producer whose cost term reads only graph inputs (groups
without producers) or no group at all (a fixed-width input), except a depthwise producer (``in_fixed = 1``) of a
group that has other producers (a grayscale first conv feeding a residual stream is therefore not protected;
protect it by id if needed). "Classifier" is the last Gemm/MatMul term of ``index.cost`` (topological order);
the groups it reads are protected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph_ops.groups import ChannelGroupIndex
from pipeline.errors import UserInputError
from pipeline.selection.plan import PruningPlan
from pipeline.selection.scorers.base import ChannelScores
from pipeline.selection.widths import _check_protect, _ladder, block_order, default_protected, measured_curve

logger = logging.getLogger(__name__)


_FLOOR = 1e-12


FINE_SHARE = 0.1
"""A group whose ``round_to``-channel step costs more than this share of the model's MACs (or params) steps finer."""


FLOOR_SHARE = 0.5
"""Measured allocation: a group is not narrowed to a width whose measured damage alone exceeds this share of the
damage of a model that ignores its input (``Sensitivity.collapse``), unless the budget needs it."""


@dataclass
class _Allocation:
    """Mutable state of the greedy allocation (local to one ``select_channels`` call)."""

    index: ChannelGroupIndex
    scores: ChannelScores
    ladders: dict[str, list[int]]
    rung: dict[str, int]
    weights: tuple[float, float]  # (MACs, params) weight of the saving; 0 for a metric without a target
    full: tuple[float, float]
    blocks: dict[str, int]
    measured: dict[str, np.ndarray] = field(default_factory=dict)  # group -> measured damage at widths 0..size

    def order(self, gid: str) -> np.ndarray:
        """The scores' elimination order, made block-fair for a group in equal blocks (:func:`block_order`)."""
        return block_order(self.scores.elimination_order(gid), self.blocks.get(gid, 1))

    def widths(self) -> dict[str, int]:
        return {gid: self.ladders[gid][r] for gid, r in self.rung.items()}

    def criterion(self, gid: str, size: int) -> np.ndarray:
        """The criterion's own share of the group lost at every width ``0..size`` (0 at ``size``, non-decreasing
        as the width falls): ``1 - r(w)`` for a retention curve, else the score mass removed over the total."""
        if gid in self.scores.retention:
            lost = 1.0 - np.clip(np.asarray(self.scores.retention[gid], dtype=np.float64)[:size + 1], 0.0, 1.0)
        else:
            values = np.maximum(self.scores.scores[gid], 0.0)
            total = float(values.sum())
            removed = np.concatenate([[0.0], np.cumsum(values[self.order(gid)])])
            lost = (removed / total if total > 0 else np.arange(size + 1) / size)[::-1]
        return np.maximum.accumulate(lost[::-1])[::-1]

    def loss(self, gid: str, old: int, new: int) -> float:
        if gid in self.measured:
            curve = self.measured[gid]
            return float(curve[new] - curve[old])
        if gid in self.scores.retention:
            curve = self.scores.retention[gid]
            return math.log(max(curve[old], _FLOOR)) - math.log(max(curve[new], _FLOOR))
        values = np.maximum(self.scores.scores[gid], 0.0)
        removed = self.order(gid)[len(values) - old:len(values) - new]
        total = float(values.sum())
        return float(values[removed].sum()) / total if total > 0 else (old - new) / len(values)

    def terms_of(self, gid: str) -> list[Any]:
        return [t for t in self.index.cost if gid in t.in_groups or gid in t.out_groups]

    def neighbours(self) -> dict[str, set[str]]:
        """Per movable group, the groups whose cost terms it shares (their next step changes when it moves)."""
        return {gid: {h for t in self.terms_of(gid) for h in (*t.in_groups, *t.out_groups)} for gid in self.ladders}

    def candidate(self, gid: str) -> tuple[float, str, float, float, float] | None:
        """(loss per cost saved, group id, loss, MACs saved, params saved) of moving ``gid`` one rung down."""
        r = self.rung[gid]
        if r + 1 >= len(self.ladders[gid]):
            return None
        old, new = self.ladders[gid][r], self.ladders[gid][r + 1]
        before = {**self.index.full_widths(), **self.widths()}
        after = {**before, gid: new}
        terms = self.terms_of(gid)
        d_macs = sum(t.macs(before) - t.macs(after) for t in terms)
        d_params = sum(t.params(before) - t.params(after) for t in terms)
        saving = self.weights[0] * d_macs / max(self.full[0], _FLOOR) + self.weights[1] * d_params / max(
            self.full[1], _FLOOR)
        if saving <= 0:
            return None
        loss = self.loss(gid, old, new)
        return loss / saving, gid, loss, d_macs, d_params


def movable_groups(scores: ChannelScores, index: ChannelGroupIndex, round_to: int, min_channels: int,
                   protect: Iterable[str], keep_first_and_last: bool) -> tuple[dict[str, str], list[Any]]:
    """The protected groups (id -> why) and the groups a planner may narrow: prunable, scored, not protected.

    Raises:
        UserInputError: ``round_to`` or ``min_channels`` below 1, or a ``protect`` id that is not a group.
    """
    if round_to < 1 or min_channels < 1:
        raise UserInputError(f"round_to and min_channels must be positive integers, got {round_to} and {min_channels}")
    user = _check_protect(index, protect)
    ends = default_protected(index) if keep_first_and_last else {}
    protected = {**{gid: f"protected by default ({why}; --prune-ends lifts that)" for gid, why in ends.items()},
                 **dict.fromkeys(user, "protected by --protect")}
    return protected, [g for g in index.groups if g.prunable and g.id not in protected and g.id in scores.scores]


def start_allocation(scores: ChannelScores, index: ChannelGroupIndex, movable: Iterable[Any], steps: Mapping[str, int],
                     round_to: int, min_channels: int) -> _Allocation:
    """Every movable group at full width on its ladder (``steps``: a group's own step instead of ``round_to``)."""
    groups = list(movable)
    ladders = {g.id: _ladder(g.size, steps.get(g.id, round_to), min_channels, g.blocks) for g in groups}
    return _Allocation(index, scores, ladders, dict.fromkeys(ladders, 0), (0.0, 0.0), index.predict(),
                       {g.id: g.blocks for g in groups})


@dataclass(frozen=True)
class PlanSetup:
    """What every planner builds before it allocates (:func:`select_channels` and
    :func:`pipeline.deployment.latency_plan.select_for_latency`): the protected groups (id -> why), the groups it may narrow,
    the budgets (name -> fraction, None: not given) and the ladder settings; its allocations and the part of the plan's
    meta they all record come from here."""

    scores: ChannelScores
    index: ChannelGroupIndex
    budgets: Mapping[str, float | None]
    round_to: int
    min_channels: int
    protected: Mapping[str, str]
    movable: tuple[Any, ...]

    @property
    def targets(self) -> tuple[float, float]:
        """The (MACs, params) fractions to reach (1.0 for a budget not given)."""
        macs, params = self.budgets.get("target_macs"), self.budgets.get("target_params")
        return macs if macs is not None else 1.0, params if params is not None else 1.0

    def allocation(self, steps: Mapping[str, int] | None = None) -> _Allocation:
        """Every movable group at full width on its ladder (:func:`start_allocation`; ``steps``: finer steps)."""
        return start_allocation(self.scores, self.index, self.movable, steps or {}, self.round_to, self.min_channels)

    def meta(self, **fields: Any) -> dict[str, Any]:
        """The plan's meta: the method, the budgets, the ladder settings and the protected groups, then ``fields``."""
        return {"method": self.scores.method, **self.budgets, "round_to": self.round_to,
                "min_channels": self.min_channels, "protected": sorted(self.protected), **fields}


def plan_setup(scores: ChannelScores, index: ChannelGroupIndex, budgets: Mapping[str, float | None], *,
               round_to: int, min_channels: int, protect: Iterable[str], keep_first_and_last: bool) -> PlanSetup:
    """The :class:`PlanSetup` of one planner call (the budgets are checked by the caller: :func:`check_fractions`).

    Raises:
        UserInputError: as :func:`movable_groups`.
    """
    protected, movable = movable_groups(scores, index, round_to, min_channels, protect, keep_first_and_last)
    return PlanSetup(scores, index, dict(budgets), round_to, min_channels, protected, tuple(movable))


def _fractions(index: ChannelGroupIndex, widths: Mapping[str, int], full: tuple[float, float]) -> tuple[float, float]:
    macs, params = index.predict(widths)
    return macs / full[0] if full[0] else 1.0, params / full[1] if full[1] else 1.0


def _choose(options: list[tuple[float, str, float, float, float]], now: tuple[float, float],
            full: tuple[float, float], targets: tuple[float, float]) -> str:
    """Best ratio; but when some steps alone meet the budget, the one of them that loses least (finishing move)."""
    finishing = [(loss, gid) for _, gid, loss, d_macs, d_params in options
                 if (now[0] - d_macs) <= targets[0] * full[0] and (now[1] - d_params) <= targets[1] * full[1]]
    if finishing:
        return min(finishing)[1]
    return min(options)[1]


def _check_targets(target_macs: float | None, target_params: float | None) -> None:
    if target_macs is None and target_params is None:
        raise UserInputError("give a budget: target_macs and/or target_params (fractions of the original, 0..1]")
    check_fractions(target_macs=target_macs, target_params=target_params)


def check_fractions(**budgets: float | None) -> None:
    """Every budget given (name -> fraction of the original, None: not given) is a fraction in (0, 1].

    Raises:
        UserInputError: naming the first budget outside (0, 1] and its value.
    """
    for name, value in budgets.items():
        if value is not None and not 0 < value <= 1:
            raise UserInputError(f"{name} must be a fraction in (0, 1], got {value}")


def _keep_lists(alloc: _Allocation) -> dict[str, tuple[int, ...]]:
    keep = {}
    for gid, width in sorted(alloc.widths().items()):
        size = alloc.ladders[gid][0]
        if width < size:
            keep[gid] = tuple(sorted(int(c) for c in alloc.order(gid)[size - width:]))
    return keep


def _fine_steps(index: ChannelGroupIndex, groups: Iterable[Any], round_to: int, share: float,
                targets: tuple[float | None, float | None]) -> dict[str, int]:
    """Groups whose ``round_to`` step is more than ``share`` of the targeted cost get half the step (once: multiples
    of 4 are what onnxruntime CPU needs, ``benchmarks/round_to.py``, so a step of 8 goes no finer than 4)."""
    full = index.predict()
    fine = {}
    for group in groups:
        if round_to < 2:
            break
        cut = index.predict({group.id: max(group.size - round_to, 0)})
        shares = [(full[i] - cut[i]) / full[i] for i in (0, 1) if targets[i] is not None and full[i] > 0]
        if max(shares, default=0.0) > share:
            fine[group.id] = round_to // 2
    return fine


Fit = Callable[[str, int], "tuple[tuple[float, ...], Any] | None"]
"""Whether a group may move back up to a width: None when the budget would no longer hold, else (tie key, what
:func:`fill_back_rungs` hands to ``accept`` when that move is taken)."""


def fill_back_rungs(alloc: _Allocation, fits: Fit, accept: Callable[[Any], None] = lambda _: None) -> int:
    """Move groups back up one rung while ``fits`` says the budget still holds, most information regained first
    (then the larger tie key, then the first group id); returns how many steps were added back. Shared by the
    MACs / params planner and the latency planner (:mod:`pipeline.deployment.latency_plan`), which differ only in the test."""
    added = 0
    while True:
        best = None
        for gid in sorted(alloc.rung):
            r = alloc.rung[gid]
            if r == 0:
                continue
            fit = fits(gid, alloc.ladders[gid][r - 1])
            if fit is None:
                continue
            key = (alloc.loss(gid, alloc.ladders[gid][r - 1], alloc.ladders[gid][r]), *fit[0])
            if best is None or key > best[0]:
                best = (key, gid, fit[1])
        if best is None:
            return added
        alloc.rung[best[1]] -= 1
        accept(best[2])
        added += 1


def _fill_back(alloc: _Allocation, targets: tuple[float, float], full: tuple[float, float]) -> int:
    """:func:`fill_back_rungs` for MACs / params fractions (ties: the smaller total fraction)."""

    def fits(gid: str, width: int) -> tuple[tuple[float], None] | None:
        fractions = _fractions(alloc.index, {**alloc.widths(), gid: width}, full)
        if fractions[0] > targets[0] or fractions[1] > targets[1]:
            return None
        return (-fractions[0] - fractions[1],), None

    return fill_back_rungs(alloc, fits)


def _step_back(alloc: _Allocation, full: tuple[float, float]) -> tuple[float, float] | None:
    """The smallest (MACs, params) fraction that adding one removed step back would cost, over the groups that lost
    channels (None when none did): after fill-back, the achieved fraction is within this of the target."""
    now = _fractions(alloc.index, alloc.widths(), full)
    steps = []
    for gid in sorted(alloc.rung):
        r = alloc.rung[gid]
        if r > 0:
            up = _fractions(alloc.index, {**alloc.widths(), gid: alloc.ladders[gid][r - 1]}, full)
            steps.append((up[0] - now[0], up[1] - now[1]))
    if not steps:
        return None
    return min(s[0] for s in steps), min(s[1] for s in steps)


def _blocked_note(index: ChannelGroupIndex, alloc: _Allocation, protected: Mapping[str, str], round_to: int,
                  min_channels: int, fractions: tuple[float, float]) -> str:
    """Why the budget was not reached: every group that could not move further, by cause (one sentence)."""
    causes: dict[str, list[str]] = {}
    floor_width = max(max(round_to, 1), math.ceil(max(min_channels, 1) / max(round_to, 1)) * max(round_to, 1))
    for group in index.groups:
        gid = group.id
        if not group.prunable:
            cause = "frozen (see 'diprune inspect')"
        elif gid in protected:
            cause = protected[gid]
        elif gid not in alloc.ladders:
            cause = "without scores"
        elif len(alloc.ladders[gid]) == 1:
            cause = f"too narrow to prune (size <= the minimum width {floor_width}: lower --round-to/--min-channels)"
        elif alloc.rung[gid] + 1 == len(alloc.ladders[gid]):
            cause = f"at their minimum width {floor_width} (--min-channels {min_channels}, --round-to {round_to})"
        else:
            cause = "whose removal saves nothing the budget counts"
        causes.setdefault(cause, []).append(gid)
    parts = [f"{len(ids)} {'group' if len(ids) == 1 else 'groups'} {cause}" for cause, ids in causes.items()]
    return (f"budget not reached (predicted MACs x{fractions[0]:.3f}, params x{fractions[1]:.3f}): nothing more can "
            f"be removed: {'; '.join(parts)}")


def _greedy(alloc: _Allocation, targets: tuple[float, float]) -> tuple[float, float]:
    """Move groups down their ladders, best step first (:func:`_choose`), until the targets hold or nothing can move;
    returns the (MACs, params) fractions reached."""
    index, full, ladders = alloc.index, alloc.full, alloc.ladders
    fractions = _fractions(index, alloc.widths(), full)
    neighbours = alloc.neighbours()
    cache: dict[str, tuple[float, str, float, float, float] | None] = {}
    while fractions[0] > targets[0] or fractions[1] > targets[1]:
        weights = (float(fractions[0] > targets[0]), float(fractions[1] > targets[1]))
        if weights != alloc.weights:
            alloc.weights, cache = weights, {}
        for gid in sorted(ladders):
            if gid not in cache:
                cache[gid] = alloc.candidate(gid)
        options = [c for c in cache.values() if c is not None]
        if not options:
            break
        gid = _choose(options, index.predict(alloc.widths()), full, targets)
        alloc.rung[gid] += 1
        for other in neighbours[gid] | {gid}:
            cache.pop(other, None)
        fractions = _fractions(index, alloc.widths(), full)
    return fractions


def _use_measurement(alloc: _Allocation, sensitivity: Any, *, floors: bool) -> dict[str, int]:
    """Put the measured damage curves into the allocation (its losses become measured ones) and, with ``floors``,
    cut every ladder below the narrowest width whose damage is at most :data:`FLOOR_SHARE` of the collapse; returns
    the groups whose floor rose that way (id -> floor width)."""
    raised = {}
    for gid, ladder in sorted(alloc.ladders.items()):
        size = ladder[0]
        curve = measured_curve(alloc.criterion(gid, size), sensitivity.widths.get(gid, ()),
                               sensitivity.damage.get(gid, ()), sensitivity.collapse)
        alloc.measured[gid] = curve
        if floors:
            allowed = [w for w in ladder if curve[w] <= FLOOR_SHARE * sensitivity.collapse]
            if len(allowed) < len(ladder):
                alloc.ladders[gid] = allowed or [size]
                raised[gid] = alloc.ladders[gid][-1]
    return raised


def _allocation_record(alloc: _Allocation, sensitivity: Any, floors: Mapping[str, int], relaxed: bool,
                       index: ChannelGroupIndex) -> dict[str, Any]:
    """``meta["allocation"]``: the measurement, the floors, and what became of the ends (first layer, classifier
    input) that the rule would have protected."""
    widths = alloc.widths()
    ends = {gid: {"why": why, "size": next(g.size for g in index.groups if g.id == gid), "kept": widths.get(gid)}
            for gid, why in default_protected(index).items()}
    return {"mode": "measured", **sensitivity.to_dict(), "floor_share": FLOOR_SHARE,
            "floors": {} if relaxed else dict(sorted(floors.items())), "floors_relaxed": relaxed, "ends": ends}


def select_channels(scores: ChannelScores, index: ChannelGroupIndex, *, target_macs: float | None = None,
                    target_params: float | None = None, round_to: int = 8, min_channels: int = 8,
                    protect: Iterable[str] = (), keep_first_and_last: bool = True, fill_back: bool = True,
                    fine_share: float | None = FINE_SHARE, sensitivity: Any = None) -> PruningPlan:
    """Choose kept channels for a MACs and/or params budget by greedy global allocation (module docstring).

    ``fill_back``: after the greedy, add back the most valuable removed steps that still fit the budget.
    ``fine_share``: a group whose ``round_to`` step is more than this share of the targeted cost gets a finer step
    (recorded in ``meta["fine_steps"]`` and the notes); None keeps every group on ``round_to``.
    ``sensitivity``: measured damage per group (a :class:`pipeline.selection.sensitivity.Sensitivity` from
    :func:`pipeline.selection.sensitivity.measure`; not imported here, which would make a cycle): the loss of a step becomes
    the measured damage it adds (the criterion only shapes the curve between measured widths), ladders stop at the
    measured floors (dropped again when the budget needs them), and ``meta["allocation"]`` records it all.

    Raises:
        UserInputError: no budget or a fraction outside (0, 1], ``min_channels`` or ``round_to`` below 1, or a
            ``protect`` id that is not a group of the model.
    """
    _check_targets(target_macs, target_params)
    if target_macs is not None and index.unknown_macs:
        unknown = index.unknown_macs
        raise UserInputError(f"a MACs budget needs every layer's MACs, but {len(unknown)} Conv/Gemm/MatMul nodes "
                             f"(e.g. '{unknown[0]}') have a dynamic spatial or token size; give the input shape with "
                             f"--input-shape NAME:1x3xHxW (prepare(path, input_shapes=...)), or use --target-params")
    setup = plan_setup(scores, index, {"target_macs": target_macs, "target_params": target_params},
                       round_to=round_to, min_channels=min_channels, protect=protect,
                       keep_first_and_last=keep_first_and_last)
    protected, targets = setup.protected, setup.targets
    fine = {} if fine_share is None else _fine_steps(index, setup.movable, round_to, fine_share,
                                                     (target_macs, target_params))
    alloc = setup.allocation(fine)
    floors = _use_measurement(alloc, sensitivity, floors=True) if sensitivity is not None else {}
    fractions = _greedy(alloc, targets)
    relaxed = False
    if floors and not (fractions[0] <= targets[0] and fractions[1] <= targets[1]):
        alloc = setup.allocation(fine)
        _use_measurement(alloc, sensitivity, floors=False)
        fractions, relaxed = _greedy(alloc, targets), True
    full = alloc.full
    reached = fractions[0] <= targets[0] and fractions[1] <= targets[1]
    notes = [] if reached else [_blocked_note(index, alloc, protected, round_to, min_channels, fractions)]
    if not reached:  # the caller reports it (the CLI once, as a warning); logged here for -v only
        logger.info(notes[0])
    added = _fill_back(alloc, targets, full) if reached and fill_back else 0
    fractions = _fractions(index, alloc.widths(), full)
    step_back = _step_back(alloc, full)
    used_fine = {gid: step for gid, step in fine.items() if alloc.rung[gid] > 0}
    notes += [f"group {gid} steps by {step} channels, not {round_to}: one {round_to}-channel step is more than "
              f"{fine_share:.0%} of the model's cost" for gid, step in sorted(used_fine.items())]
    meta = setup.meta(macs_fraction=None if index.unknown_macs else fractions[0], params_fraction=fractions[1],
                      reached=reached, notes=notes, filled_back=added, fine_steps=used_fine,
                      step_back=None if step_back is None else {"macs": None if index.unknown_macs else step_back[0],
                                                                "params": step_back[1]})
    if sensitivity is not None:
        meta["allocation"] = _allocation_record(alloc, sensitivity, floors, relaxed, index)
    return PruningPlan(model_sha256=scores.model_sha256, keep=_keep_lists(alloc), meta=meta)
