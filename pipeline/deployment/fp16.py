"""FP16 artifact: the pruned model with its float tensors in IEEE half precision, and how far it is from fp32.

Conversion (:func:`convert_fp16`) is onnxruntime's ``onnxruntime.transformers.float16.convert_float_to_float16``
(the converter of onnxconverter-common, shipped inside the onnxruntime wheel, so no new dependency): every float32
initializer and value becomes float16 (values of magnitude below ``5.96e-8`` become that smallest subnormal,
above ``65504`` clip to it), except

* the ops of the block list, which stay fp32 behind Cast nodes (:data:`FP16_OP_BLOCK_LIST`: the converter's own
  list, ops whose fp16 result is not meaningful or that have no fp16 kernel in ONNX (ML ops, TopK, NonMaxSuppression,
  RoiAlign, Range, CumSum, Min, Max, Upsample); more with ``op_block_list``), and
* with ``keep_io_types`` (the default) the graph's inputs and outputs, which stay fp32 with a Cast inside the graph,
  so the fp16 file takes the same feeds as the fp32 one.

Comparison (:func:`fp16_record`): both models over the held-out data, onnxruntime CPU: top-1 of each, agreement of
their argmax, and per output ``max_abs_diff = max |y16 - y32|`` and ``relative_error = ||y16 - y32|| / ||y32||``
(:func:`pipeline.evaluation.evaluate.evaluate` with the fp32 model as reference). A file converted without ``keep_io_types``
is measured through its fp32-I/O twin (the same conversion with ``keep_io_types``): the internal graph is the same,
only the rounding of the inputs to fp16 moves from the caller into a Cast node, so the results are the same.
onnxruntime's CPU provider has fp16 kernels for a few ops only; for the others it inserts Casts to fp32 around the
node (its ``InsertCastTransformer``), so on CPU the file runs and rounds to fp16 between layers but is not faster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import onnx

from pipeline.errors import UserInputError

logger = logging.getLogger(__name__)


def _converter() -> Any:
    from onnxruntime.transformers import float16

    return float16


FP16_OP_BLOCK_LIST: tuple[str, ...] = tuple(_converter().DEFAULT_OP_BLOCK_LIST)
"""Ops kept fp32 in every fp16 file (the converter's default block list; see the module docstring)."""


def convert_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True,
                 op_block_list: Iterable[str] = ()) -> onnx.ModelProto:
    """The model in fp16 (module docstring); the input model is not modified."""
    source = onnx.ModelProto()
    source.CopyFrom(model)
    blocked = sorted({*FP16_OP_BLOCK_LIST, *op_block_list})
    try:
        return _converter().convert_float_to_float16(source, keep_io_types=keep_io_types, op_block_list=blocked)
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as err:
        raise UserInputError(f"the fp16 conversion failed: {err}") from err


def fp16_path(out_path: str | Path) -> Path:
    """Where ``prune`` writes the FP16 model: ``OUT.onnx`` -> ``OUT.fp16.onnx``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.fp16{out.suffix or '.onnx'}")


def fp16_record(fp32: onnx.ModelProto, fp16: onnx.ModelProto, evaluate: Callable[..., Any] | None, *,
                keep_io_types: bool, op_block_list: Iterable[str] = ()) -> dict[str, Any]:
    """The report section ``fp16``: the conversion settings and, with ``evaluate(model, reference)`` (held-out data;
    reference None or a model to compare with), top-1 of both models, agreement and the output differences (module
    docstring)."""
    blocked = sorted({*FP16_OP_BLOCK_LIST, *op_block_list})
    present = sorted({n.op_type for n in fp32.graph.node} & set(blocked))
    record: dict[str, Any] = {"converter": "onnxruntime.transformers.float16.convert_float_to_float16",
                              "keep_io_types": keep_io_types, "op_block_list": blocked,
                              "blocked_ops_in_model": present}
    if evaluate is None:
        return record
    measured = fp16 if keep_io_types else convert_fp16(fp32, keep_io_types=True, op_block_list=op_block_list)
    reference = evaluate(fp32, None)
    half = evaluate(measured, fp32)
    outputs = half.get("outputs") or {}
    record.update({
        "fp32_top1": reference.get("top1"), "fp16_top1": half.get("top1"), "agreement": half.get("agreement"),
        "top1_drop_points": None if reference.get("top1") is None or half.get("top1") is None
        else round(100 * (reference["top1"] - half["top1"]), 4),
        "max_abs_diff": max((o["max_abs_diff"] for o in outputs.values()), default=None),
        "outputs": outputs, "measured_on": "onnxruntime CPU" + ("" if keep_io_types else " (fp32-I/O twin)")})
    return record


def fp16_summary(record: dict[str, Any]) -> str:
    """One line for the CLI."""
    if record.get("fp16_top1") is None and record.get("max_abs_diff") is None:
        return "fp16: not evaluated (pass --eval-data)"
    top1 = "" if record.get("fp16_top1") is None else (
        f"top-1 {record['fp32_top1']:.4f} (fp32) -> {record['fp16_top1']:.4f} (fp16), ")
    return f"fp16: {top1}max output difference {record['max_abs_diff']:.3g} (onnxruntime CPU)"


def fp16_stage(pruned: onnx.ModelProto, evaluate: Callable[..., Any] | None, *, keep_io_types: bool = True,
               op_block_list: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The fp16 model of ``prune --precision fp16`` and its report section (:func:`fp16_record`)."""
    half = convert_fp16(pruned, keep_io_types=keep_io_types, op_block_list=op_block_list)
    return half, fp16_record(pruned, half, evaluate, keep_io_types=keep_io_types, op_block_list=op_block_list)
