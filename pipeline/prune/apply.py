"""Apply a plan file to a model file: remove the channels (or, with ``mask_only``, zero their exit weights)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from graph_ops.io import check_writable, save_model, verify_model
from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from pipeline.data.task import Task
from pipeline.errors import UserInputError
from pipeline.model.prepare import prepare
from pipeline.prune.orchestrate import keep_lists
from pipeline.selection.plan import PruningPlan


def apply_plan_file(model_path: str | Path, plan_path: str | Path, out_path: str | Path, *,
                    mask_only: bool = False, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> str:
    """Validate the plan against the model file, rewrite, verify, save atomically; return a one-line summary.

    The model is prepared with ``input_shapes``, else with the input shapes the plan was made with (plan meta
    ``input_shapes``); giving shapes that differ from the plan's is refused.
    """
    out = check_writable(out_path, model_path, plan_path)
    plan = PruningPlan.load(plan_path)
    planned = planned_input_shapes(plan, str(plan_path))
    task = Task.from_dict(plan.meta.get("task"), f"plan {plan_path}: meta.task")
    prepared = prepare(model_path, input_shapes or planned, task=task)
    if input_shapes and planned and dict(prepared.input_shapes) != planned:
        raise UserInputError(f"the plan was made with --input-shape {planned}, not {dict(prepared.input_shapes)}; "
                             f"apply it with the same input shapes")
    plan.validate(prepared.index, prepared.sha256)
    keep = keep_lists(plan)
    rewritten = zero_channels(prepared.model, prepared.index, keep) if mask_only else apply_plan(
        prepared.model, prepared.index, keep, verify=False)
    result = prepared.restore_io(rewritten)  # the file's own dynamic input and output dims
    verify_model(result)
    save_model(result, out)
    before, after = prepared.cost, prepared.count(result)
    kind = "masked" if mask_only else "pruned"
    macs = (f"MACs {before.macs} -> {after.macs} ({after.macs / before.macs:.3f})" if not before.unresolved
            and before.macs else "MACs unknown (a dynamic input size: give --input-shape)")
    return (f"wrote {out} ({kind}): {macs}, "
            f"params {before.params} -> {after.params} ({after.params / before.params:.3f})")


def planned_input_shapes(plan: PruningPlan, source: str) -> dict[str, tuple[int, ...]]:
    """The input shapes a plan records (``meta.input_shapes``: ``{input name: [positive dims]}``), checked: a plan
    file edited by hand gets one error naming the field, not a traceback."""
    shapes = plan.meta.get("input_shapes") or {}
    ok = isinstance(shapes, dict) and all(
        isinstance(name, str) and name and isinstance(dims, list) and dims
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
        for name, dims in shapes.items())
    if not ok:
        raise UserInputError(f"{source}: meta.input_shapes must map input names to lists of positive dims, e.g. "
                             f"{{\"images\": [1, 3, 640, 640]}}; got {shapes!r}")
    return {name: tuple(dims) for name, dims in shapes.items()}
