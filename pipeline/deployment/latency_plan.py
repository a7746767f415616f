"""Latency budgets: plans whose latency, measured on the deployment target, is a requested fraction of the original's.

Allocation (:func:`select_for_latency`). As in :func:`pipeline.selection.allocate.select_channels` (the same ladders, protection
and information loss of a step: DI retention or score mass), but a step's saving is the latency it saves,
predicted by the target's latency model (:mod:`pipeline.deployment.latency_model`), plus the MACs / params it saves when those
budgets are also given and not met yet::

    saving = sum over unmet budgets b of  delta_b / full_b        (b in latency, MACs, params)

Each step takes the smallest ``loss / saving`` (ties: group id); a step that saves nothing the budget counts (a
width inside the same channel block of the runtime) is extended down the ladder to the first rung that does (at
most ``MAX_SKIP`` rungs). When single steps would meet every budget, the finishing step is the one of them that
loses least. Then the fill-back moves groups back up while every predicted budget still holds, most information
regained first.

Two step orders are tried and the plan that loses least information is kept: the one above (``budgets``), and the
same steps ranked by ``loss / MACs saved`` (``macs``), taken until the predicted budgets hold. The latency ratio is
the better guide where the latency model sees what MACs miss (depthwise, memory-bound layers), but its per-step
savings are small differences of measured times, so on models whose time follows their MACs the MACs order can
reach the same predicted latency losing less (before this, ``benchmarks/latency_budget.py`` measured torchvision
ResNet-50 at 0.5 losing 4.48 with the latency order against 4.01 for a MACs plan of equal measured latency; with both
orders the latency plan lost less than the MACs plan of equal latency in all 12 MNIST cells); trying both
makes the planner never lose more, on its own measure, than the MACs order at the same predicted latency.

Closed loop (:func:`closed_loop`, :func:`plan_for_latency`). The plan for the requested fraction ``F`` is applied
and timed against the original in interleaved rounds (:func:`pipeline.deployment.timing.interleaved_ratios`); when the measured
ratio ``m`` is not within ``tolerance`` of ``F``, the planner's aim is corrected and the plan made again: first
multiplicatively (``aim' = p * F / m``, ``p`` the plan's predicted fraction: what the model got wrong at this point
is assumed to hold near it), then, once tries lie on both sides of ``F``, by interpolating ``log m`` against
``log p`` between the closest ones. At most ``iterations`` plans are timed; the loop stops early when the planner
returns a plan it already timed. The result is, among the tries within
``tolerance`` (else within ``band``) of ``F``, the one that loses the least information; without one, the largest
that is at or below ``F``, else the fastest (a note says the budget was not met, with the numbers). The same loop
drives a MACs budget to a measured latency (the benchmark's "MACs plan of equal latency").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from graph_ops.groups import ChannelGroupIndex
from graph_ops.prune import apply_plan
from pipeline.deployment.latency_build import key_digest, latency_model_for
from pipeline.deployment.latency_model import LatencyModel, LatencyTarget
from pipeline.deployment.timing import interleaved_ratios
from pipeline.errors import UserInputError
from pipeline.model.prepare import PreparedModel
from pipeline.selection.allocate import _Allocation, _keep_lists, check_fractions, fill_back_rungs, plan_setup
from pipeline.selection.plan import PruningPlan
from pipeline.selection.scorers.base import ChannelScores

logger = logging.getLogger(__name__)

MAX_SKIP = 4
_FLOOR = 1e-12


@dataclass(frozen=True)
class LatencyBudget:
    """A latency budget: the fraction of the original's measured latency, the target it is measured on, the closed
    loop's settings, where latency models are cached (None: not cached), whether building one shows a progress
    bar (stderr); ``model_file``: a latency model fitted on the target's own profiles (``diprune latency fit``),
    planned against without timing anything here."""

    target: float
    on: LatencyTarget = field(default_factory=LatencyTarget)
    iterations: int = 4
    tolerance: float = 0.05
    band: float = 0.10
    cache_dir: Path | None = None
    model_file: Path | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise UserInputError(f"--target-latency is a fraction of the original latency in (0, 1], got "
                                 f"{self.target}")
        if self.iterations < 1:
            raise UserInputError(f"the closed loop needs at least one iteration, got {self.iterations}")

    def to_dict(self) -> dict[str, Any]:
        """What reports record of the budget."""
        if self.model_file is not None:
            return {"target_latency": self.target, "backend": self.on.backend, "latency_model": str(self.model_file)}
        return {"target_latency": self.target, "backend": self.on.backend, "batch": self.on.batch,
                "threads": self.on.threads, "iterations": self.iterations, "tolerance": self.tolerance,
                "band": self.band}


@dataclass
class _State:
    """Mutable state of one latency allocation (local to :func:`select_for_latency`)."""

    alloc: _Allocation
    model: LatencyModel
    kernels_of: Mapping[str, tuple[int, ...]]
    full: tuple[float, float, float]  # MACs, params, kernel microseconds of the unpruned model
    now: list[float]  # the same, now

    def widths(self) -> dict[str, int]:
        return self.model.widths(self.alloc.widths())

    def latency_fraction(self, kernel_us: float) -> float:
        return self.model.whole_us(kernel_us) / self.model.whole_us(self.full[2])

    def fractions(self, now: Iterable[float] | None = None) -> tuple[float, float, float]:
        macs, params, us = list(self.now if now is None else now)
        return (macs / self.full[0] if self.full[0] else 1.0, params / self.full[1] if self.full[1] else 1.0,
                self.latency_fraction(us))

    def deltas(self, gid: str, new: int) -> tuple[float, float, float]:
        """(MACs, params, kernel microseconds) saved by moving ``gid`` to width ``new``."""
        before = self.widths()
        after = {**before, gid: new}
        terms = self.alloc.terms_of(gid)
        d_macs = sum(t.macs(before) - t.macs(after) for t in terms)
        d_params = sum(t.params(before) - t.params(after) for t in terms)
        kernels = self.model.kernels
        d_us = sum(kernels[i].time_us(before) - kernels[i].time_us(after) for i in self.kernels_of.get(gid, ()))
        return d_macs, d_params, d_us

    def option(self, gid: str, weights: tuple[float, float, float]) -> tuple[float, str, float, int,
                                                                               tuple[float, float, float]] | None:
        """(loss per saving, gid, loss, new rung, deltas) of the next step of ``gid`` that saves something."""
        ladder, r = self.alloc.ladders[gid], self.alloc.rung[gid]
        for new_rung in range(r + 1, min(r + 1 + MAX_SKIP, len(ladder))):
            deltas = self.deltas(gid, ladder[new_rung])
            d_lat = self.latency_fraction(self.now[2] - deltas[2]) - self.latency_fraction(self.now[2])
            saving = (weights[0] * deltas[0] / max(self.full[0], _FLOOR)
                      + weights[1] * deltas[1] / max(self.full[1], _FLOOR) - weights[2] * d_lat)
            if saving > 1e-12:
                loss = self.alloc.loss(gid, ladder[r], ladder[new_rung])
                return loss / saving, gid, loss, new_rung, deltas
        return None


@dataclass(frozen=True)
class _Tried:
    """One step order's allocation (local to :func:`select_for_latency`)."""

    rank: str
    state: _State
    reached: bool
    added: int
    lost: float


RANKINGS = ("budgets", "macs")
"""The step orders :func:`select_for_latency` tries (module docstring): by saving on the unmet budgets, by MACs."""


def select_for_latency(scores: ChannelScores, index: ChannelGroupIndex, model: LatencyModel, *,
                       target_latency: float, target_macs: float | None = None, target_params: float | None = None,
                       round_to: int = 8, min_channels: int = 8, protect: Iterable[str] = (),
                       keep_first_and_last: bool = True, fill_back: bool = True,
                       rankings: Iterable[str] = RANKINGS) -> PruningPlan:
    """Kept channels for a predicted latency fraction (and optional MACs / params fractions); module docstring.

    Raises:
        UserInputError: a fraction outside (0, 1], a non-positive ``round_to``/``min_channels``, an unknown
            ``protect`` id or ranking, or a latency model made for other group widths.
    """
    budgets = {"target_latency": target_latency, "target_macs": target_macs, "target_params": target_params}
    check_fractions(**budgets)
    rankings = tuple(rankings)
    unknown = sorted(set(rankings) - set(RANKINGS))
    if unknown or not rankings:
        raise UserInputError(f"unknown step rankings {unknown or 'none'}; choose from {', '.join(RANKINGS)}")
    if dict(model.full_widths) != index.full_widths():
        raise UserInputError("the latency model was measured on another model (its group widths differ)")
    setup = plan_setup(scores, index, budgets, round_to=round_to, min_channels=min_channels, protect=protect,
                       keep_first_and_last=keep_first_and_last)
    targets = (*setup.targets, target_latency)
    full_us = model.kernel_us()
    tried = []
    for rank in rankings:
        alloc = setup.allocation()
        state = _State(alloc, model, model.by_group(), (*alloc.full, full_us), [*alloc.full, full_us])
        reached = _allocate(state, targets, rank)
        added = _fill_back(state, targets) if reached and fill_back else 0
        tried.append(_Tried(rank, state, reached, added, _information_lost(alloc)))
    # reached first, then least information lost (unreached: lowest predicted latency), then the order given
    best = min(tried, key=lambda t: (not t.reached, t.lost if t.reached else t.state.fractions()[2],
                                     rankings.index(t.rank)))
    rank, state, reached, added, lost = best.rank, best.state, best.reached, best.added, best.lost
    macs_f, params_f, lat_f = state.fractions()
    notes = [] if reached else [f"latency budget not reached: predicted latency x{lat_f:.3f}, MACs x{macs_f:.3f}, "
                                f"params x{params_f:.3f} with every movable group at its floor (frozen, protected "
                                f"or at --min-channels); --prune-ends or a smaller --min-channels frees more"]
    meta = setup.meta(macs_fraction=macs_f, params_fraction=params_f, latency_fraction=lat_f, reached=reached,
                      notes=notes, filled_back=added, information_lost=lost, ranked_by=rank,
                      information_lost_by_ranking={t.rank: t.lost for t in tried if t.reached})
    return PruningPlan(model_sha256=scores.model_sha256, keep=_keep_lists(state.alloc), meta=meta)


def _allocate(state: _State, targets: tuple[float, float, float], rank: str) -> bool:
    """Take steps (module docstring) until every predicted budget holds; whether they all do. ``rank``:
    ``budgets`` (a step's saving on the budgets not met yet) or ``macs`` (its MACs saving alone)."""
    alloc, model = state.alloc, state.model
    ladders = alloc.ladders
    neighbours = {gid: near | {h for i in state.kernels_of.get(gid, ()) for h in model.kernels[i].groups}
                  for gid, near in alloc.neighbours().items()}
    cache: dict[str, Any] = {}
    weights: tuple[float, float, float] | None = None
    while any(f > t + 1e-12 for f, t in zip(state.fractions(), targets, strict=True)):
        now_weights = (1.0, 0.0, 0.0) if rank == "macs" else tuple(
            float(f > t + 1e-12) for f, t in zip(state.fractions(), targets, strict=True))
        if now_weights != weights:
            weights, cache = now_weights, {}
        for gid in sorted(ladders):
            if gid not in cache:
                cache[gid] = state.option(gid, weights)
        options = [c for c in cache.values() if c is not None]
        if not options:
            break
        finishing = [(o[2], o[1], o) for o in options
                     if all(f <= t + 1e-12 for f, t in zip(
                         state.fractions([n - d for n, d in zip(state.now, o[4], strict=True)]), targets,
                         strict=True))]
        chosen = min(finishing)[2] if finishing else min(options)
        _, gid, _, new_rung, deltas = chosen
        alloc.rung[gid] = new_rung
        state.now = [n - d for n, d in zip(state.now, deltas, strict=True)]
        for other in neighbours[gid] | {gid}:
            cache.pop(other, None)
    return all(f <= t + 1e-12 for f, t in zip(state.fractions(), targets, strict=True))


def with_information_lost(plan: PruningPlan, scores: ChannelScores, index: ChannelGroupIndex) -> PruningPlan:
    """The plan with ``meta["information_lost"]``: the sum over its groups of the loss (as the planners count it)
    of going from full width to the kept width; lets MACs plans be compared with latency plans."""
    alloc = _Allocation(index, scores, {}, {}, (0.0, 0.0), (1.0, 1.0), {g.id: g.blocks for g in index.groups})
    sizes = {g.id: g.size for g in index.groups}
    lost = sum(alloc.loss(gid, sizes[gid], len(keep)) for gid, keep in sorted(plan.keep.items()))
    return replace(plan, meta={**plan.meta, "information_lost": float(lost)})


def _information_lost(alloc: _Allocation) -> float:
    """Sum over groups of the loss of going from full width to the chosen width."""
    return float(sum(alloc.loss(gid, ladder[0], ladder[alloc.rung[gid]])
                     for gid, ladder in sorted(alloc.ladders.items()) if alloc.rung[gid]))


def _fill_back(state: _State, targets: tuple[float, float, float]) -> int:
    """:func:`pipeline.selection.allocate.fill_back_rungs` while every predicted budget holds (no tie key: the first group id)."""

    def fits(gid: str, width: int) -> tuple[tuple[()], list[float]] | None:
        deltas = state.deltas(gid, width)  # negative: the cost goes up
        now = [n - d for n, d in zip(state.now, deltas, strict=True)]
        if any(f > t + 1e-12 for f, t in zip(state.fractions(now), targets, strict=True)):
            return None
        return (), now

    def accept(now: list[float]) -> None:
        state.now = now

    return fill_back_rungs(state.alloc, fits, accept)


# ----------------------------------------------------------------------------------------------- closed loop


def _next_aim(tried: list[dict[str, Any]], goal: float) -> float:
    """The next predicted fraction to ask for (module docstring)."""
    below = [t for t in tried if t["measured"] <= goal]
    above = [t for t in tried if t["measured"] > goal]
    if below and above:
        lo = max(below, key=lambda t: t["measured"])
        hi = min(above, key=lambda t: t["measured"])
        x0, x1 = math.log(lo["predicted"]), math.log(hi["predicted"])
        y0, y1 = math.log(lo["measured"]), math.log(hi["measured"])
        if y1 > y0 and x1 != x0:
            return math.exp(x0 + (math.log(goal) - y0) * (x1 - x0) / (y1 - y0))
    last = min(tried, key=lambda t: abs(math.log(t["measured"] / goal)))
    return last["predicted"] * goal / last["measured"]


def _pick(tried: list[dict[str, Any]], goal: float, tolerance: float, band: float) -> dict[str, Any]:
    for width in (tolerance, band):
        inside = [t for t in tried if abs(t["measured"] / goal - 1) <= width]
        if inside:
            return min(inside, key=lambda t: (t["lost"], -t["measured"]))
    meeting = [t for t in tried if t["measured"] <= goal]
    if meeting:
        return max(meeting, key=lambda t: t["measured"])
    return min(tried, key=lambda t: t["measured"])


def closed_loop(make: Callable[[float], PruningPlan], measure: Callable[[PruningPlan], float], goal: float, *,
                predicted: Callable[[PruningPlan], float], iterations: int = 4, tolerance: float = 0.05,
                band: float = 0.10) -> tuple[PruningPlan, list[dict[str, Any]]]:
    """Plans for a measured fraction ``goal`` (module docstring): ``make(aim)`` plans for a predicted fraction,
    ``measure(plan)`` times it; returns the chosen plan and every try (aim, predicted, measured, information lost)."""
    aim, tried = goal, []
    for _ in range(iterations):
        plan = make(aim)
        if any(t["plan"].keep == plan.keep for t in tried):
            break  # the planner gives the same plan again: measuring it again would not help
        p, m = predicted(plan), measure(plan)
        tried.append({"aim": round(aim, 6), "predicted": p, "measured": m, "plan": plan,
                      "lost": float(plan.meta.get("information_lost", 0.0)),
                      "macs_fraction": plan.meta.get("macs_fraction")})
        logger.info("closed loop: aim %.4f -> predicted %.4f, measured %.4f (goal %.4f)", aim, p, m, goal)
        if abs(m / goal - 1) <= tolerance or (m > goal and plan.meta.get("reached") is False):
            break
        aim = min(1.0, max(1e-4, _next_aim(tried, goal)))
    best = _pick(tried, goal, tolerance, band)
    return best["plan"], [{k: v for k, v in t.items() if k != "plan"} for t in tried]


def measure_plan(prepared: PreparedModel, plan: PruningPlan, on: LatencyTarget, *, rounds: int | None = None) -> float:
    """Measured latency of the pruned model relative to the original (interleaved rounds on ``on``)."""
    keep = {gid: tuple(chans) for gid, chans in plan.keep.items()}
    pruned = prepared.at_sizes(apply_plan(prepared.model, prepared.index, keep, verify=False))
    result = interleaved_ratios([prepared.at_sizes(prepared.model), pruned], backend=on.backend, batch=on.batch,
                                threads=on.threads, rounds=rounds or on.rounds, round_seconds=on.round_seconds,
                                seed=on.seed)
    return result.ratios[1]


def plan_for_latency(prepared: PreparedModel, scores: ChannelScores, budget: LatencyBudget, *,
                     target_macs: float | None = None, target_params: float | None = None, round_to: int = 8,
                     min_channels: int = 8, protect: Iterable[str] = (), keep_first_and_last: bool = True,
                     model: LatencyModel | None = None) -> PruningPlan:
    """A plan whose latency measured on ``budget.on`` is ``budget.target`` of the original's (closed loop), also
    meeting the optional MACs / params budgets; ``plan.meta["latency"]`` records the model and every try. With
    ``budget.model_file`` the plan is made against that latency model's prediction instead (:func:`plan_on_model`)."""
    check_fractions(target_latency=budget.target, target_macs=target_macs, target_params=target_params)
    options = {"target_macs": target_macs, "target_params": target_params, "round_to": round_to,
               "min_channels": min_channels, "protect": protect, "keep_first_and_last": keep_first_and_last}
    if budget.model_file is not None:
        return plan_on_model(prepared, scores, budget, **options)
    model = model or latency_model_for(prepared, budget.on, budget.cache_dir, round_to=round_to,
                                       min_channels=min_channels, progress=budget.progress)

    def make(aim: float) -> PruningPlan:
        return select_for_latency(scores, prepared.index, model, target_latency=aim, **options)

    plan, tried = closed_loop(make, lambda p: measure_plan(prepared, p, budget.on), budget.target,
                              predicted=lambda p: p.meta["latency_fraction"], iterations=budget.iterations,
                              tolerance=budget.tolerance, band=budget.band)
    chosen = next(t for t in tried if t["predicted"] == plan.meta["latency_fraction"])
    measured = chosen["measured"]
    within = abs(measured / budget.target - 1) <= budget.band
    notes = list(plan.meta.get("notes", ()))
    if not within:
        notes.append(f"measured latency x{measured:.3f} of the original is not within {budget.band:.0%} of the "
                     f"requested x{budget.target:.3f} after {len(tried)} measured plan(s)")
    errors = model.errors()
    record = {**budget.to_dict(), "measured_ratio": measured, "predicted_ratio": chosen["predicted"],
              "within_band": within, "tries": tried, "model": {
                  "key": key_digest(model.key), "block": model.key.get("block"),
                  "predicted_ms": model.predict_ms(), "validation_errors": errors}}
    meta = {**plan.meta, "target_latency": budget.target, "reached": within or measured <= budget.target,
            "notes": notes, "latency": record}
    return replace(plan, meta=meta)


def plan_on_model(prepared: PreparedModel, scores: ChannelScores, budget: LatencyBudget, **options: Any
                  ) -> PruningPlan:
    """The plan for ``budget.target`` predicted by the latency model in ``budget.model_file`` (fitted on the target's
    own profiles: :mod:`pipeline.deployment.device_profiles`). Nothing is timed here: the closed loop, which corrects the plan
    by timing it, is replaced by the model's prediction, and the plan's notes and ``meta.latency`` say so."""
    from pipeline.deployment.device_profiles import load_latency_model

    model = load_latency_model(budget.model_file, prepared)
    plan = select_for_latency(scores, prepared.index, model, target_latency=budget.target, **options)
    predicted = plan.meta["latency_fraction"]
    key = dict(model.key)
    note = (f"planned on the latency model {budget.model_file} ({key.get('source', 'local measurement')}, device "
            f"{key.get('device')}): predicted latency x{predicted:.3f} of the original; not timed here (no closed "
            "loop), time the pruned model on the target to confirm")
    record = {**budget.to_dict(), "measured_ratio": None, "predicted_ratio": predicted, "closed_loop": False,
              "tries": [], "model": {"file": str(budget.model_file), "key": key_digest(model.key),
                                     "source": key.get("source"), "device": key.get("device"),
                                     "predicted_ms": model.predict_ms(), "validation_errors": model.errors()}}
    meta = {**plan.meta, "target_latency": budget.target, "notes": [*plan.meta.get("notes", ()), note],
            "latency": record}
    return replace(plan, meta=meta)
