"""The INT8 stage of ``prune --quantize int8``: quantize the pruned and recovered model (optionally with DI-guided
mixed precision) and compare original fp32, original int8, pruned fp32 and pruned int8.

The recipe is the deployment backend's (:data:`pipeline.deployment.quantize.BACKEND_RECIPES`: ``ort-cpu`` the x86 recipe,
``tensorrt`` / ``ort-trt`` / ``ort-cuda`` TensorRT's symmetric signed int8). The four models are timed only where
the target runs here (:func:`timed_here`: an onnxruntime backend whose provider this onnxruntime has); a TensorRT
target is compared on accuracy only (onnxruntime CPU runs the QDQ file) and the report gives the ``trtexec`` command
that builds and times it on the board (:mod:`pipeline.deployment.deploy`): asking for INT8 never needs the latency model.

The two quantizers (:class:`pipeline.deployment.quantize.Int8Quantizer`) calibrate on the same calibration data as pruning;
with ``max_top1_drop`` the pruned model's layers are ranked (:mod:`pipeline.deployment.mixed_precision`) and the most sensitive
kept fp32 until the INT8 model's held-out top-1 is within that many points of the pruned fp32 model's. Accuracy
comes from the caller's ``evaluate`` (held-out data, agreement with the original), latency from one set of
interleaved rounds over the four models (:func:`pipeline.deployment.quantize.compare_precisions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx

from pipeline.deployment.latency_model import LatencyTarget
from pipeline.deployment.mixed_precision import SENSITIVITIES, search_mixed_precision
from pipeline.deployment.quantize import (
    CALIBRATIONS,
    DEFAULT_SAMPLES,
    INT8_RECIPES,
    QUANTIZE_MODES,
    Int8Quantizer,
    compare_precisions,
)
from pipeline.errors import UserInputError
from pipeline.model.runtime import ORT_BACKENDS

logger = logging.getLogger(__name__)

QUANTIZATION = INT8_RECIPES["x86"].to_dict()
"""The default (``ort-cpu``) recipe as reports record it."""


def timed_here(backend: str) -> bool:
    """Whether the INT8 stage can time ``backend`` on this machine: an onnxruntime backend whose first provider
    this onnxruntime build offers (``tensorrt`` is built and timed on the board, with the report's command)."""
    if backend not in ORT_BACKENDS:
        return False
    import onnxruntime as ort

    return ORT_BACKENDS[backend][0] in ort.get_available_providers()


def check_int8_options(quantize: str | None, max_top1_drop: float | None, ranking: str, eval_data: Any,
                       data: Any, calibration: str | None = None) -> None:
    """Refuse INT8 options that cannot work, before any work."""
    if quantize is None:
        if max_top1_drop is not None:
            raise UserInputError("--max-top1-drop chooses the layers kept fp32 in an INT8 model: add --quantize int8")
        if calibration is not None:
            raise UserInputError("--int8-calibration sets how an INT8 model is calibrated: add --quantize int8")
        return
    if calibration is not None and calibration not in CALIBRATIONS:
        raise UserInputError(f"unknown INT8 calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
    if quantize not in QUANTIZE_MODES:
        raise UserInputError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if data is None:
        raise UserInputError("--quantize int8 calibrates activation ranges on the calibration data: pass --data")
    if ranking not in SENSITIVITIES:
        raise UserInputError(f"unknown INT8 ranking {ranking!r}; choose one of {', '.join(SENSITIVITIES)}")
    if max_top1_drop is not None and eval_data is None:
        raise UserInputError("--max-top1-drop measures held-out accuracy: pass --eval-data")


def int8_stage(original: onnx.ModelProto, pruned: onnx.ModelProto, data: Any,
               evaluate: Callable[[onnx.ModelProto], dict[str, Any]] | None, on: LatencyTarget, *,
               max_top1_drop: float | None = None, ranking: str = "di", samples: int = DEFAULT_SAMPLES,
               workdir: str | Path | None = None, recipe: str = "x86", calibration: str | None = None,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The pruned INT8 model and the report section ``int8`` (module docstring); ``evaluate`` None: latency only.
    ``on``: the deployment target (timed only when :func:`timed_here`); ``recipe``: a key of
    :data:`pipeline.deployment.quantize.INT8_RECIPES`; ``input_shapes``: the sizes the models are timed at where their inputs
    have dynamic dims besides the batch."""
    options = {"samples": samples, "workdir": workdir, "recipe": recipe, "calibration": calibration}
    quant_original = Int8Quantizer(original, data, **options)
    quant_pruned = Int8Quantizer(pruned, data, **options)
    try:
        mixed = None
        if max_top1_drop is not None and evaluate is not None:
            mixed = search_mixed_precision(quant_pruned, lambda m: evaluate(m)["top1"], max_top1_drop,
                                           ranking=ranking)
            pruned_int8 = mixed.model
        else:
            pruned_int8 = quant_pruned.quantize()
        models = {"original_fp32": original, "original_int8": quant_original.quantize(), "pruned_fp32": pruned,
                  "pruned_int8": pruned_int8}
        timed = timed_here(on.backend)
        comparison = compare_precisions(models, evaluate or (lambda _: {}), on if timed else None,
                                        input_shapes=input_shapes)
        quantization = quant_pruned.describe()
    finally:
        quant_original.close()
        quant_pruned.close()
    if not timed:
        comparison["latency_note"] = (f"not timed here: {on.backend} does not run on this machine; build and time "
                                      "the INT8 file on the board with the report's command (artifacts)")
    record = {**comparison, "quantization": quantization,
              "mixed_precision": None if mixed is None else {**mixed.to_dict(), "max_top1_drop": max_top1_drop}}
    return pruned_int8, record


def int8_path(out_path: str | Path) -> Path:
    """Where ``prune`` writes the INT8 model: ``OUT.onnx`` -> ``OUT.int8.onnx``."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.int8{out.suffix or '.onnx'}")


def int8_summary(record: dict[str, Any]) -> str:
    """One line for the CLI: top-1 and speedup of the four models."""
    parts = []
    for name, row in record["models"].items():
        top1 = "" if row.get("top1") is None else f"top-1 {row['top1']:.4f}"
        time = "" if row.get("latency_ms") is None else f"{row['latency_ms']:.3f} ms ({row['speedup']:.2f}x)"
        parts.append(f"{name.replace('_', ' ')} {', '.join(p for p in (top1, time) if p) or '-'}")
    mixed = record.get("mixed_precision")
    if mixed:
        parts.append(f"{len(mixed['fp32_layers'])} layer(s) kept fp32 ({mixed['ranking']} ranking"
                     f"{'' if mixed['met'] else ', accuracy target NOT met'})")
    recipe = record.get("quantization", {})
    untimed = "" if record.get("latency") else " (not timed here)"
    return (f"int8 ({recipe.get('recipe', 'x86')} recipe, {recipe.get('calibration', 'minmax')} calibration"
            f"{untimed}): " + "; ".join(parts))
