"""Plain summaries of an analysed model, for ``diprune inspect`` (text and ``--json``)."""

from __future__ import annotations

from typing import Any

from graph_ops.channels import prunable_share
from pipeline.prepare import PreparedModel


def inspect_summary(prepared: PreparedModel) -> dict[str, Any]:
    """One JSON-ready object: identity, cost, and every group with its freeze reason (or null)."""
    cost = prepared.cost
    groups = [
        {"id": g.id, "size": g.size, "frozen": g.frozen, "producers": list(g.producers),
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
        "prunable_groups": sum(1 for g in prepared.index.groups if g.prunable),
        "prunable_conv_share": round(prunable_share(prepared.model, prepared.index), 6),
        "groups": groups,
    }
