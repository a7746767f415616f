"""Apply a plan file to a model file: remove the channels (or, with ``mask_only``, zero their exit weights)."""

from __future__ import annotations

from pathlib import Path

from graph_ops.cost import count
from graph_ops.io import check_writable, save_model
from graph_ops.mask import zero_channels
from graph_ops.proto import declared_shapes
from graph_ops.prune import apply_plan
from pipeline.orchestrate import keep_lists
from pipeline.plan import PruningPlan
from pipeline.prepare import prepare
from pipeline.task import Task


def apply_plan_file(model_path: str | Path, plan_path: str | Path, out_path: str | Path, *,
                    mask_only: bool = False) -> str:
    """Validate the plan against the model file, rewrite, verify, save atomically; return a one-line summary."""
    out = check_writable(out_path, model_path, plan_path)
    plan = PruningPlan.load(plan_path)
    prepared = prepare(model_path, Task.from_dict(plan.meta.get("task")))
    plan.validate(prepared.index, prepared.sha256)
    rewrite = zero_channels if mask_only else apply_plan
    result = rewrite(prepared.model, prepared.index, keep_lists(plan))
    save_model(result, out)
    before, after = prepared.cost, count(result, declared_shapes(result))
    kind = "masked" if mask_only else "pruned"
    return (f"wrote {out} ({kind}): MACs {before.macs} -> {after.macs} ({after.macs / before.macs:.3f}), "
            f"params {before.params} -> {after.params} ({after.params / before.params:.3f})")
