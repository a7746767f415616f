"""MACs and parameter counter for ONNX models.

Convention (batch counted as 1; 1 MAC = one multiply-accumulate):

* Conv: ``C_out * (C_in / group) * prod(kernel) * prod(output spatial)`` = ``W.size * prod(output spatial)``.
* ConvTranspose: ``C_in * (C_out / group) * prod(kernel) * prod(input spatial)`` = ``W.size * prod(input spatial)``.
* Gemm: ``M * K * N`` with ``M = 1`` (the batch), K and N from the weight (or the input/output shapes).
* MatMul with a constant right operand ``(K, N)``: ``prod(output shape without its first (batch) dim) * K``.
  MatMul between two activations is not counted.
* Every other op (activations, pools, BatchNormalization, elementwise, ...) counts 0 MACs.

Parameters are the element counts of:

* the constant weight and bias inputs of Conv, ConvTranspose, Gemm, and the constant weight of MatMul;
* an unfused BatchNormalization: ``2 * C`` (the scale and shift it reduces to at inference; mean and var are not
  counted separately);
* PRelu: its slope tensor.

Per-channel constants of Add/Mul and every other initializer are not counted. In a quantized (QDQ) model a weight
or bias that reaches its node through ``DequantizeLinear`` of a constant counts as that constant (same shape, same
MACs and parameter count as the fp32 model). Output spatial sizes come from the
shapes the caller passes (a prepared model's analysis holds them) or from ONNX shape inference on a light copy. A node whose needed dims are not static is counted with 0 MACs and listed in
``CostReport.unresolved`` (a warning is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import onnx

from graph_ops.proto import Shape, constants, static_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostReport:
    """Total MACs and params, and the per-node breakdown ``name -> (op_type, macs, params)``.

    Attributes:
        macs: total multiply-accumulates for batch 1.
        params: total counted parameters (see the module docstring).
        by_node: every node with nonzero MACs or params.
        unresolved: names of nodes whose MACs could not be computed (non-static shapes); counted as 0.
    """

    macs: int
    params: int
    by_node: Mapping[str, tuple[str, int, int]] = field(default_factory=lambda: MappingProxyType({}))
    unresolved: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_node", MappingProxyType(dict(self.by_node)))


def _prod(dims: tuple[int | None, ...]) -> int | None:
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


def _size(consts: Mapping[str, tuple[int, ...]], names: list[str]) -> int:
    return sum(int(np.prod(consts[n], dtype=np.int64)) for n in names if n and n in consts)


def _node_cost(
    node: onnx.NodeProto, shapes: Mapping[str, tuple[int | None, ...]], consts: Mapping[str, tuple[int, ...]]
) -> tuple[int | None, int]:
    """(MACs or None when unresolved, params) of one node."""
    op, ins = node.op_type, list(node.input)
    if op in ("Conv", "ConvTranspose"):
        weight = shapes.get(ins[1])
        spatial = shapes.get(ins[0] if op == "ConvTranspose" else node.output[0])
        if weight is None or spatial is None:
            return None, _size(consts, ins[1:3])
        per_pixel, pixels = _prod(weight), _prod(spatial[2:])
        macs = None if per_pixel is None or pixels is None else per_pixel * pixels
        return macs, _size(consts, ins[1:3])
    if op == "Gemm":
        a, out, w = shapes.get(ins[0]), shapes.get(node.output[0]), shapes.get(ins[1])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        trans_b = any(at.name == "transB" and at.i for at in node.attribute)
        static = w is not None and len(w) == 2 and None not in w  # a static 2-D weight gives K and N
        k = a[0 if trans_a else 1] if a is not None and len(a) == 2 else None
        n = out[1] if out is not None and len(out) == 2 else None
        k = k if k is not None or not static else w[1 if trans_b else 0]  # type: ignore[index]
        n = n if n is not None or not static else w[0 if trans_b else 1]  # type: ignore[index]
        return (None if k is None or n is None else k * n), _size(consts, ins[1:3])
    if op == "MatMul" and len(ins) > 1 and ins[1] in consts and len(consts[ins[1]]) == 2:
        out = shapes.get(node.output[0])
        rest = _prod(out[1:]) if out else None
        return (None if rest is None else rest * consts[ins[1]][0]), _size(consts, ins[1:2])
    if op == "BatchNormalization":
        return 0, 2 * _size(consts, ins[1:2])
    if op == "PRelu":
        return 0, _size(consts, ins[1:2])
    return 0, 0


def count(model: onnx.ModelProto, shapes: Mapping[str, Shape] | None = None) -> CostReport:
    """Count MACs (batch 1) and parameters of a model under the module's convention.

    Args:
        model: any ONNX model (not modified).
        shapes: its static shapes when the caller has fresh ones (``ChannelGroupIndex.shapes``, or a model's
            declared shapes right after surgery); default: shape inference on a light copy.

    Returns:
        The totals and the per-node breakdown (nodes with nonzero cost only; unnamed nodes as ``<op>@<index>``).
    """
    shapes = static_shapes(model) if shapes is None else shapes
    consts = {name: tuple(t.dims) for name, t in constants(model).items()}
    dequantized = {node.output[0]: consts[node.input[0]] for node in model.graph.node
                   if node.op_type == "DequantizeLinear" and node.input and node.input[0] in consts}
    if dequantized:  # QDQ weights: the constant behind DequantizeLinear
        consts.update(dequantized)
        shapes = {**shapes, **dequantized}
    by_node: dict[str, tuple[str, int, int]] = {}
    unresolved: list[str] = []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}@{index}"
        macs, params = _node_cost(node, shapes, consts)
        if macs is None:
            unresolved.append(name)
            macs = 0
        if macs or params:
            by_node[name] = (node.op_type, int(macs), int(params))
    if unresolved:
        logger.warning("MACs of %d nodes could not be computed (non-static shapes), counted as 0: %s",
                       len(unresolved), ", ".join(unresolved[:5]))
    total_macs = sum(v[1] for v in by_node.values())
    total_params = sum(v[2] for v in by_node.values())
    return CostReport(macs=total_macs, params=total_params, by_node=by_node, unresolved=tuple(unresolved))
