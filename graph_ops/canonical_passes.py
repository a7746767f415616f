"""The canonicalization passes (registered in :data:`graph_ops.canonicalize.PASSES`; contract in that module).

Each pass is ``name(graph: gs.Graph, /) -> PassResult`` (protocol in :mod:`graph_ops.passes`): it mutates one
onnx-graphsurgeon graph in place and calls neither ``cleanup()`` nor ``toposort()``.

* ``fold_constants``: Constant nodes become initializers and every constant subgraph is folded (onnx-graphsurgeon's
  ``fold_constants`` evaluates it with onnxruntime), Shape->...->Reshape chains of static shapes included.
* ``remove_identity``: Identity and inference Dropout nodes are bypassed (graph output names are kept).
* ``name_nodes``: unique non-empty node names (``<op>_<k>`` for the rest).
* ``fuse_batchnorm``: with ``s = gamma / sqrt(var + eps)``, ``W' = W * s`` along the output-channel axis and
  ``b' = (b - mean) * s + beta`` (float64, stored in the weight dtype): exact up to rounding.
* ``materialize_bias``: an own 1-D bias for every Conv / ConvTranspose / Gemm (Gemm ``beta`` folded in), and no
  weight / bias / per-channel operand shared between two slots (copies ``<orig>__<node>``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_ops.errors import PreconditionError
from graph_ops.passes import PassResult, graph_from_model, model_from_graph

logger = logging.getLogger(__name__)

WEIGHTED = ("Conv", "ConvTranspose", "Gemm")
CHANNEL_OPERAND = ("Add", "Mul", "Sub", "Div", "PRelu")


def _unique_name(graph: gs.Graph, base: str) -> str:
    """``base`` if no tensor has that name, else ``base_1``, ``base_2``, ..."""
    taken = graph.tensors().keys()
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _const(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(_unique_name(graph, base), np.ascontiguousarray(values))


def fold_constants(graph: gs.Graph, /) -> PassResult:
    """Turn Constant nodes into initializers and fold every constant subgraph (shape chains included)."""
    before = sum(isinstance(t, gs.Variable) for n in graph.nodes for t in n.inputs)
    had_constant_nodes = any(n.op == "Constant" for n in graph.nodes)
    graph.fold_constants(fold_shapes=True, error_ok=True)
    after = sum(isinstance(t, gs.Variable) for n in graph.nodes for t in n.inputs)
    return PassResult(modified=had_constant_nodes or after != before)


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for slot, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[slot] = new


def _bypass(graph: gs.Graph, node: gs.Node) -> str | None:
    """Remove a single-input pass-through node; return a note when it has to stay."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst not in graph.outputs:
        for consumer in list(dst.outputs):
            _replace_input(consumer, dst, src)
        node.outputs.clear()
        return None
    if isinstance(src, gs.Constant) or not src.inputs or src in graph.outputs or src in graph.inputs:
        return f"kept {node.op} {node.name}: it copies a graph input, constant or output to graph output {dst.name}"
    # dst is a graph output: let src's producer write dst directly so the output name stays.
    producer = src.inputs[0]
    for consumer in list(src.outputs):
        if consumer is not node:
            _replace_input(consumer, src, dst)
    node.outputs.clear()
    producer.outputs[producer.outputs.index(src)] = dst
    return None


def remove_identity(graph: gs.Graph, /) -> PassResult:
    """Drop Identity and inference-mode Dropout nodes, rewiring their consumers (graph output names are kept)."""
    notes: list[str] = []
    modified = False
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Dropout") or not node.inputs or not node.outputs:
            continue
        if node.op == "Dropout" and not _is_inference_dropout(graph, node):
            notes.append(f"kept Dropout {node.name}: training mode or mask output in use")
            continue
        note = _bypass(graph, node)
        if note:
            notes.append(note)
        else:
            modified = True
    return PassResult(modified, tuple(notes))


def _is_inference_dropout(graph: gs.Graph, node: gs.Node) -> bool:
    mask_used = len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1] in graph.outputs)
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if (training is not None and training.name
            and (not isinstance(training, gs.Constant) or bool(np.asarray(training.values).any()))):
        return False
    return not mask_used


def name_nodes(graph: gs.Graph, /) -> PassResult:
    """Give every node a unique non-empty name: unique names are kept, the rest become ``<op>_<k>``."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.name:
            counts[node.name] = counts.get(node.name, 0) + 1
    used = {name for name, c in counts.items() if c == 1}
    k_by_op: dict[str, int] = {}
    renamed = 0
    for node in graph.nodes:
        if node.name and counts[node.name] == 1:
            continue
        k = k_by_op.get(node.op, 0)
        while f"{node.op}_{k}" in used or f"{node.op}_{k}" in counts:
            k += 1
        node.name = f"{node.op}_{k}"
        used.add(node.name)
        k_by_op[node.op] = k + 1
        renamed += 1
    return PassResult(renamed > 0, (f"named {renamed} nodes",) if renamed else ())


def _values(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _out_channels(node: gs.Node) -> int:
    """Output channels of a weighted node from its constant weight."""
    w = node.inputs[1].shape
    if node.op == "Conv":
        return int(w[0])
    if node.op == "ConvTranspose":
        return int(w[1]) * int(node.attrs.get("group", 1))
    return int(w[0] if node.attrs.get("transB", 0) else w[1])


def _scale_weight(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``W * s`` along the output-channel axis of a Conv / ConvTranspose / Gemm weight."""
    if node.op == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op == "Gemm":
        return w * (s[:, None] if node.attrs.get("transB", 0) else s[None, :])
    group = int(node.attrs.get("group", 1))  # ConvTranspose W: (C_in, C_out/group, k...)
    grouped = w.reshape((group, w.shape[0] // group, *w.shape[1:]))
    scale = s.reshape((group, 1, w.shape[1], *(1,) * (w.ndim - 2)))
    return (grouped * scale).reshape(w.shape)


def _bias_vector(node: gs.Node, n_out: int) -> np.ndarray | None:
    """The node's bias as a float64 vector of length n_out (beta folded for Gemm); None when not a vector."""
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is None:
        return np.zeros(n_out)
    values = _values(bias)
    if values is None:
        return None
    values = values.astype(np.float64) * float(node.attrs.get("beta", 1.0) if node.op == "Gemm" else 1.0)
    if values.size == 1:
        return np.full(n_out, values.reshape(()))
    if values.size == n_out and values.shape[-1] == n_out:
        return values.reshape(n_out)
    return None


def _fusable(graph: gs.Graph, bn: gs.Node) -> str | None:
    """None when ``bn`` can be folded into its producer, else the reason it stays."""
    x = bn.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None or producer.op not in WEIGHTED:
        return "input is not produced by Conv/ConvTranspose/Gemm"
    if len(x.outputs) != 1 or x in graph.outputs:
        return f"output of {producer.name} is also used elsewhere"
    if any(_values(t) is None for t in bn.inputs[1:5]) or _values(producer.inputs[1]) is None:
        return "a weight or BN operand is not constant"
    if len(bn.outputs) > 1 and any(o.outputs or o in graph.outputs for o in bn.outputs[1:]):
        return "training-mode outputs are used"
    if _bias_vector(producer, _out_channels(producer)) is None:
        return "producer bias is not a per-channel constant"
    return None


def _fold_bn(graph: gs.Graph, bn: gs.Node) -> None:
    producer = bn.inputs[0].inputs[0]
    gamma, beta, mean, var = (_values(t).astype(np.float64) for t in bn.inputs[1:5])
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    weight = producer.inputs[1]
    dtype = _values(weight).dtype
    new_w = _scale_weight(producer, _values(weight).astype(np.float64), s).astype(dtype)
    b = _bias_vector(producer, s.size)
    new_b = ((b - mean) * s + beta).astype(dtype)
    bias_base = producer.inputs[2].name if len(producer.inputs) > 2 and producer.inputs[2].name else f"{producer.name}.bias"
    producer.inputs[1] = _const(graph, f"{weight.name}__bn", new_w)
    bias = _const(graph, f"{bias_base}__bn", new_b)
    if len(producer.inputs) > 2:
        producer.inputs[2] = bias
    else:
        producer.inputs.append(bias)
    if producer.op == "Gemm":
        producer.attrs["beta"] = 1.0
    y = bn.outputs[0]
    bn.outputs.clear()
    producer.outputs[0] = y


def fuse_batchnorm(graph: gs.Graph, /) -> PassResult:
    """Fold BatchNormalization into the Conv / ConvTranspose / Gemm before it (see the module docstring)."""
    notes: list[str] = []
    fused = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or not bn.outputs:
            continue
        reason = _fusable(graph, bn)
        if reason:
            notes.append(f"kept {bn.name}: {reason}")
            continue
        _fold_bn(graph, bn)
        fused += 1
    return PassResult(fused > 0, (f"fused {fused} BatchNormalization", *notes))


def _set_bias(graph: gs.Graph, node: gs.Node) -> str | None:
    """Give one weighted node an explicit 1-D bias (Gemm: beta folded); return a note when left alone."""
    if _values(node.inputs[1]) is None:
        return f"{node.name}: weight is not constant"
    n_out = _out_channels(node)
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    if has_bias and node.op != "Gemm":
        return None
    beta = float(node.attrs.get("beta", 1.0))
    if has_bias and beta == 1.0 and tuple(node.inputs[2].shape or ()) == (n_out,):
        return None
    vector = _bias_vector(node, n_out)
    if vector is None:
        return f"{node.name}: bias is not a per-channel constant"
    dtype = _values(node.inputs[1]).dtype
    base = f"{node.inputs[2].name}__{node.name}" if has_bias else f"{node.name}.bias"
    bias = _const(graph, base, vector.astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = bias  # replaces an existing or an empty ("") bias slot
    else:
        node.inputs.append(bias)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    return ""


def _constant_uses(graph: gs.Graph) -> dict[str, list[tuple[gs.Node, int]]]:
    uses: dict[str, list[tuple[gs.Node, int]]] = {}
    for node in graph.nodes:
        for slot, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                uses.setdefault(tensor.name, []).append((node, slot))
    return uses


def _owned_slot(node: gs.Node, slot: int, tensor: gs.Constant) -> bool:
    """True for slots that must not share their constant: weights/biases and per-channel operands."""
    if node.op in WEIGHTED:
        return slot in (1, 2)
    return node.op in CHANNEL_OPERAND and int(np.prod(tensor.shape)) > 1


def _unshare(graph: gs.Graph) -> int:
    """Give every owned slot that shares its constant a private copy ``<orig>__<node>``."""
    copies = 0
    for name, uses in sorted(_constant_uses(graph).items()):
        if len(uses) < 2:
            continue
        tensor = uses[0][0].inputs[uses[0][1]]
        owned = [(n, s) for n, s in uses if _owned_slot(n, s, tensor)]
        if len(owned) == len(uses):
            owned = owned[1:]  # every use needs its own constant: the first keeps the original
        for node, slot in owned:
            node.inputs[slot] = _const(graph, f"{name}__{node.name}", np.array(tensor.values, copy=True))
            copies += 1
    return copies


def materialize_bias(graph: gs.Graph, /) -> PassResult:
    """Explicit own 1-D bias for every Conv/ConvTranspose/Gemm, and no shared weight/bias/per-channel constant."""
    notes: list[str] = []
    added = 0
    for node in graph.nodes:
        if node.op not in WEIGHTED:
            continue
        if len(node.inputs) < 2:
            raise PreconditionError(f"{node.op} {node.name} has fewer than two inputs; the model is malformed")
        note = _set_bias(graph, node)
        if note:
            notes.append(note)
        elif note == "":
            added += 1
    copies = _unshare(graph)
    return PassResult(added + copies > 0, (f"{added} biases set, {copies} shared constants copied", *notes))


def fold_shape_chains(model: onnx.ModelProto, max_rounds: int = 64) -> onnx.ModelProto:
    """Alternate shape inference (with data propagation) and constant folding until nothing more folds.

    One folding round resolves the shape chains whose inputs have inferred shapes; a folded Reshape target gives the
    next block its shapes only after inference runs again (a ShuffleNet exported with a dynamic batch: one block per
    round once the input size is fixed). Used when input sizes are fixed (``pipeline.model.prepare.prepare`` with
    ``input_shapes``); exact (folding evaluates the same ops with onnxruntime). Returns a new model.
    """
    graph = graph_from_model(model)
    for _ in range(max_rounds):
        before = len(graph.nodes)
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
        if len(graph.nodes) == before:
            break
        graph = graph_from_model(model_from_graph(graph, model))
    return model_from_graph(graph, model)
