"""Deployment artifacts: which file ``prune`` wrote for which precision and backend, and the command that builds and
times it on the target.

One record per artifact (:func:`artifact_record`): ``precision`` (fp32 / fp16 / int8), ``file``, ``meant_for`` (what
runs it) and ``command``, the line a user runs on the board:

* TensorRT targets (``tensorrt``, ``ort-trt``): ``trtexec`` building the engine from the file with the precision's
  flags (:data:`pipeline.deployment.trtexec.PRECISION_FLAGS`: fp16 ``--fp16``; int8 ``--int8 --fp16``, TensorRT reading the
  file's Q/DQ nodes (explicit quantization), fp16 allowed where the file has none), the input shapes at the latency
  batch (``--shapes``, needed for a dynamic batch), saving the engine, timing with CUDA graphs and spin-wait, and a
  separate profiling run that exports the per-layer times and layer info (what ``diprune latency fit`` reads).
* onnxruntime targets: ``diprune bench FILE --backend B --batch N``.

Nothing here runs TensorRT: where no GPU is lent the commands are given, not run.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from pipeline.deployment.trtexec import trtexec_args

TRT_BACKENDS = ("tensorrt", "ort-trt")
"""Backends whose files are built with TensorRT (trtexec lines)."""

MEANT_FOR: dict[str, str] = {
    "fp32": "every backend (TensorRT chooses fp32/tf32 kernels; add --fp16 to let it use fp16)",
    "fp16": "TensorRT (--fp16) and onnxruntime CUDA / TensorRT; onnxruntime CPU runs it through fp32 casts",
}
"""What runs an fp32 / fp16 artifact (an int8 artifact says it with its recipe)."""


def trt_shapes(model: onnx.ModelProto, batch: int = 1) -> str | None:
    """trtexec's ``--shapes`` for the model's inputs with a dynamic batch set to ``batch`` (None when another
    dimension is dynamic: the user must give it)."""
    weights = {init.name for init in model.graph.initializer}
    parts = []
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in vi.type.tensor_type.shape.dim]
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            return None
        parts.append(f"{vi.name}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts) or None


def board_command(path: str | Path, precision: str, backend: str, model: onnx.ModelProto, *, batch: int = 1) -> str:
    """The command that builds and times the file on the target (module docstring)."""
    path = Path(path)
    if backend not in TRT_BACKENDS:
        return shlex.join(["diprune", "bench", str(path), "--backend", backend, "--batch", str(batch)])
    stem = path.with_suffix("")
    args = trtexec_args(path, shapes=trt_shapes(model, batch), precision=precision, engine=f"{stem}.engine",
                        profile=f"{stem}.profile.json", layer_info=f"{stem}.layers.json")
    return shlex.join(["trtexec", *args])


def artifact_record(path: str | Path, precision: str, backend: str, model: onnx.ModelProto, *, batch: int = 1,
                    meant_for: str | None = None) -> dict[str, Any]:
    """One artifact of a prune run (module docstring)."""
    return {"precision": precision, "file": str(path), "backend": backend,
            "meant_for": meant_for or MEANT_FOR.get(precision, backend),
            "command": board_command(path, precision, backend, model, batch=batch)}


def artifacts_summary(artifacts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Lines for the CLI: each artifact and its command."""
    return [f"{a['precision']} {a['file']} ({a['meant_for']}): {a['command']}" for a in artifacts.values()]
