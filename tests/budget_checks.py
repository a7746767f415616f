"""Checks of a budgeted plan against the graph it prunes (shared by the unit and the zoo planner tests).

"One rounding step" (the tolerance of a MACs budget), defined from the plan alone: for every group the plan shrinks
(kept width ``w < size``), the MACs that moving it back *up* one rung of its ladder (``w -> min(w + round_to,
size)``) would add to the final widths, as predicted by the cost model (which the surgery tests pin to
``graph_ops.cost.count``). The greedy's last step moved one such group down one rung from a state that was above the
target, so undoing it gives back exactly that state: ``achieved > target - max_step`` must hold.

When the plan says ``reached: false``, it must be legitimately so: every group the planner may move (prunable, not
protected, scored) is at the bottom of its ladder, the smallest multiple of ``round_to`` that is ``>= min_channels``
(or its full size when that is smaller).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx

from graph_ops.cost import count
from graph_ops.groups import ChannelGroupIndex
from pipeline.selection.plan import PruningPlan


@dataclass(frozen=True)
class BudgetCheck:
    """What a plan achieved: the counted MACs fraction, the target, and one rounding step (as a fraction)."""

    achieved: float
    target: float
    step: float
    reached: bool


def widths_of(plan: PruningPlan, index: ChannelGroupIndex) -> dict[str, int]:
    """Final width of every group under this plan."""
    return {g.id: len(plan.keep.get(g.id, range(g.size))) for g in index.groups}


def rounding_step(plan: PruningPlan, index: ChannelGroupIndex, round_to: int) -> float:
    """The largest predicted MACs increase of moving one shrunk group up one rung (see the module docstring; a
    group the planner gave a finer step, ``meta["fine_steps"]``, moves by that step)."""
    widths = widths_of(plan, index)
    fine = plan.meta.get("fine_steps", {})
    now = index.predict(widths)[0]
    steps = [index.predict({**widths, g.id: min(widths[g.id] + math.lcm(fine.get(g.id, round_to), g.blocks),
                                                g.size)})[0] - now
             for g in index.groups if widths[g.id] < g.size]
    return max(steps, default=0.0)


def floor_width(size: int, round_to: int, min_channels: int) -> int:
    """The bottom rung of a group's ladder."""
    bottom = max(round_to, math.ceil(max(min_channels, 1) / round_to) * round_to)
    return size if size <= bottom else bottom


def check_budget(plan: PruningPlan, index: ChannelGroupIndex, original: onnx.ModelProto, pruned: onnx.ModelProto,
                 target: float, round_to: int = 8, min_channels: int = 8,
                 counter: Callable[[onnx.ModelProto], Any] = count) -> BudgetCheck:
    """Assert the MACs budget contract of a plan; return the numbers for reporting.

    Asserts: kept widths are multiples of ``round_to`` (of ``lcm(round_to, blocks)`` for a group in equal blocks; or
    full); the counted MACs fraction of ``pruned`` equals
    the plan's predicted fraction; and either it is ``<= target`` and within one rounding step of it, or the plan
    says ``reached: false`` with a note and no movable group whose shrinking would save MACs is above its floor
    (a group whose convs have unknown spatial size, e.g. behind an unfolded dynamic Reshape, costs 0 predicted MACs,
    so shrinking it cannot help a MACs budget).
    """
    fine = plan.meta.get("fine_steps", {})
    for gid, kept in plan.keep.items():
        group = index.group(gid)
        step = fine.get(gid, round_to)
        assert step in (round_to, round_to // 2), (gid, step)
        assert len(kept) % math.lcm(step, group.blocks) == 0 and len(kept) < group.size, (gid, len(kept))
    full = counter(original).macs  # counter: e.g. PreparedModel.count (the prepared input sizes, dynamic dims kept)
    achieved = counter(pruned).macs / full
    assert math.isclose(achieved, plan.meta["macs_fraction"], rel_tol=1e-9), (achieved, plan.meta["macs_fraction"])
    step = rounding_step(plan, index, round_to) / full
    reached = bool(plan.meta["reached"])
    if reached:
        assert achieved <= target, (achieved, target)
        assert achieved > target - step, (achieved, target, step)
    else:
        assert plan.meta["notes"] and achieved > target, plan.meta
        widths, protected = widths_of(plan, index), set(plan.meta["protected"])
        movable = [g for g in index.groups if g.prunable and g.id not in protected]
        now = index.predict(widths)[0]
        floors = {g.id: floor_width(g.size, math.lcm(round_to, g.blocks), min_channels) for g in movable}
        above = [g.id for g in movable if widths[g.id] > floors[g.id]
                 and index.predict({**widths, g.id: floors[g.id]})[0] < now]
        assert not above, f"target missed although shrinking these groups would save MACs: {above}"
    return BudgetCheck(achieved=achieved, target=target, step=step, reached=reached)
