"""Canonicalization passes: the graph form that channel analysis relies on.

After ``canonicalize`` (the passes of ``graph_ops.CANONICALIZE`` in order) a model satisfies:

1. **No Constant nodes**; every constant subgraph is folded into an initializer (onnx-graphsurgeon
   ``fold_constants`` evaluates it with onnxruntime), including Shape->Gather->...->Reshape chains whose input shape
   is static. Dynamic dims (e.g. the batch) keep their Shape chain.
2. **No Identity and no inference Dropout** nodes (graph-output names are kept; an Identity between a graph input or
   a constant and a graph output is the only one left).
3. **Every node has a unique, non-empty name**; existing unique names are kept, others become ``<op>_<k>``.
4. **BatchNormalization directly after Conv / ConvTranspose / Gemm is fused** when the producer's output feeds only
   that BN and is not a graph output, all operands are constant and the BN has one output. With
   ``s = gamma / sqrt(var + eps)``: ``W' = W * s`` (along the output-channel axis), ``b' = (b - mean) * s + beta``.
   This is exact up to float rounding (computed in float64, stored in the weight dtype). Other BNs stay (analysis
   treats them as per-channel ops).
5. **Every Conv / ConvTranspose / Gemm with a constant weight has its own 1-D bias initializer** of length C_out
   (zeros when it had none). Gemm biases are also normalised: ``beta`` is folded into the bias (``beta = 1``) and a
   bias of shape ``(1, N)`` or ``()`` becomes ``(N,)``; a genuine ``(M, N)`` bias is left as is (noted).
6. **No constant is shared** between two weight/bias slots of Conv/ConvTranspose/Gemm, nor between two non-scalar
   operands of Add/Mul/Sub/Div/PRelu: every such use but one gets a copy named ``<orig>__<node>``.
7. The model's opset is kept, and its IR version unless below 4: IR 3 requires every initializer to be a graph
   input, which new constants are not, so such models become IR 4 (``graph_ops.passes.MIN_IR_VERSION``; exact,
   IR 4 reads IR 3 graphs the same). Constant graph inputs are dropped. ``value_info`` is re-inferred (strict).

No pass changes a graph input or output name. Weights are never mutated in place: changed weights are new
constants whose name adds a suffix (``__bn``, ``__<node>``) to the original.
"""

from __future__ import annotations

import onnx

from graph_ops.canonical_passes import (
    fold_constants,
    fuse_batchnorm,
    materialize_bias,
    name_nodes,
    remove_identity,
)
from graph_ops.passes import GraphPass, run_passes

PASSES: dict[str, GraphPass] = {
    "fold_constants": fold_constants,
    "remove_identity": remove_identity,
    "name_nodes": name_nodes,
    "fuse_batchnorm": fuse_batchnorm,
    "materialize_bias": materialize_bias,
}
"""Pass name -> pass function (the registry; ``run_passes`` looks names up here)."""

CANONICALIZE: tuple[str, ...] = ("fold_constants", "remove_identity", "name_nodes", "fuse_batchnorm", "materialize_bias")
"""The default canonicalization order."""


def canonicalize(model: onnx.ModelProto, *, verify: bool = True) -> onnx.ModelProto:
    """Run ``graph_ops.CANONICALIZE`` on a copy of ``model`` and return the canonical model (see module docstring).

    Args:
        model: any ONNX model with its external data loaded (``graph_ops.io.load_model``); not modified.
        verify: run the full ONNX checker on the result.

    Returns:
        The canonical model, same opset and IR version (at least 4), fresh inferred shapes.
    """
    return run_passes(model, CANONICALIZE, verify=verify, registry=PASSES)
