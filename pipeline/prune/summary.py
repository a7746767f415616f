"""Plain summaries of an analysed model, for ``diprune inspect`` (text and ``--json``)."""

from __future__ import annotations

from typing import Any

from graph_ops.channels import prunable_share
from pipeline.model.prepare import PreparedModel
from pipeline.selection.widths import default_protected


def inspect_summary(prepared: PreparedModel) -> dict[str, Any]:
    """One JSON-ready object: identity, cost, and every group with its freeze reason (or null), whether the planner
    protects it by default (``"first layer"`` / ``"classifier input"``, or null) and its ``status`` (``prunable``,
    ``protected`` or ``frozen``); ``prunable_groups``, ``protected_groups`` and ``frozen_groups`` count each status
    (a protected group is not counted as prunable)."""
    cost = prepared.cost
    ends = default_protected(prepared.index)
    groups = [
        {"id": g.id, "size": g.size, "status": _status(g.frozen, ends.get(g.id)), "frozen": g.frozen,
         "protected": None if g.frozen else ends.get(g.id), "producers": list(g.producers),
         "consumers": list(g.consumers), "probes": list(g.probes), "blocks": g.blocks}
        for g in prepared.index.groups
    ]
    return {
        "format": "diprune.inspect/1",
        "model": str(prepared.path),
        "model_sha256": prepared.sha256,
        "macs": None if cost.unresolved else int(cost.macs),
        "macs_unknown_nodes": list(cost.unresolved),
        "input_shapes": {k: list(v) for k, v in prepared.input_shapes.items()},
        "params": int(cost.params),
        "prunable_groups": sum(1 for g in groups if g["status"] == "prunable"),
        "protected_groups": sum(1 for g in groups if g["status"] == "protected"),
        "frozen_groups": sum(1 for g in groups if g["status"] == "frozen"),
        "prunable_conv_share": round(prunable_share(prepared.model, prepared.index), 6),
        "groups": groups,
    }


def _status(frozen: str | None, protected: str | None) -> str:
    return "frozen" if frozen else "protected" if protected else "prunable"


def group_status_text(group: dict[str, Any]) -> str:
    """The status column of ``diprune inspect``: ``prunable``, ``protected (first layer; by the rule allocation
    only, --prune-ends lifts that)`` or ``frozen (reason)``."""
    if group["frozen"]:
        return f"frozen ({group['frozen']})"
    if group["protected"]:
        return f"protected ({group['protected']}; by --allocation rule only, --prune-ends lifts that)"
    return "prunable"
