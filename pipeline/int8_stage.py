"""The INT8 stage of ``prune --quantize int8``: quantize the pruned and recovered model (optionally with DI-guided
mixed precision) and compare original fp32, original int8, pruned fp32 and pruned int8.

The two quantizers (:class:`pipeline.quantize.Int8Quantizer`) calibrate on the same calibration data as pruning;
with ``max_top1_drop`` the pruned model's layers are ranked (:mod:`pipeline.mixed_precision`) and the most sensitive
kept fp32 until the INT8 model's held-out top-1 is within that many points of the pruned fp32 model's. Accuracy
comes from the caller's ``evaluate`` (held-out data, agreement with the original), latency from one set of
interleaved rounds over the four models (:func:`pipeline.quantize.compare_precisions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx

from pipeline.errors import UserInputError
from pipeline.latency_model import LatencyTarget
from pipeline.mixed_precision import SENSITIVITIES, search_mixed_precision
from pipeline.quantize import DEFAULT_SAMPLES, QUANTIZE_MODES, Int8Quantizer, compare_precisions

logger = logging.getLogger(__name__)

QUANTIZATION = {"format": "QDQ", "weights": "int8 symmetric, per output channel", "activations": "uint8 asymmetric",
                "calibration": "MinMax"}


def check_int8_options(quantize: str | None, max_top1_drop: float | None, ranking: str, eval_data: Any,
                       data: Any) -> None:
    """Refuse INT8 options that cannot work, before any work."""
    if quantize is None:
        if max_top1_drop is not None:
            raise UserInputError("--max-top1-drop chooses the layers kept fp32 in an INT8 model: add --quantize int8")
        return
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
               workdir: str | Path | None = None,
               input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The pruned INT8 model and the report section ``int8`` (module docstring); ``evaluate`` None: latency only;
    ``input_shapes``: the sizes the models are timed at where their inputs have dynamic dims besides the batch."""
    quant_original = Int8Quantizer(original, data, samples=samples, workdir=workdir)
    quant_pruned = Int8Quantizer(pruned, data, samples=samples, workdir=workdir)
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
        comparison = compare_precisions(models, evaluate or (lambda _: {}), on, input_shapes=input_shapes)
    finally:
        quant_original.close()
        quant_pruned.close()
    record = {**comparison, "quantization": {**QUANTIZATION, "calibration_samples": samples},
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
        top1 = "" if row.get("top1") is None else f"top-1 {row['top1']:.4f}, "
        parts.append(f"{name.replace('_', ' ')} {top1}{row['latency_ms']:.3f} ms ({row['speedup']:.2f}x)")
    mixed = record.get("mixed_precision")
    if mixed:
        parts.append(f"{len(mixed['fp32_layers'])} layer(s) kept fp32 ({mixed['ranking']} ranking"
                     f"{'' if mixed['met'] else ', accuracy target NOT met'})")
    return "int8: " + "; ".join(parts)
