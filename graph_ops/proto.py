"""Small helpers over ONNX protos, shared by analysis, surgery, cost counting, probes and recovery (one home).

* reading: :func:`attr` / :func:`attrs` (node attributes), :func:`opset` (default-domain opset), :func:`node_name`,
  :func:`constants` (initializers and ``Constant`` node outputs by name);
* shapes: :func:`declared_shapes` reads the shapes a model already declares (inputs, ``value_info``, outputs,
  initializers) without running inference; :func:`infer_shapes_light` runs ONNX shape inference on a copy without
  the large weights (they become typed inputs, :func:`light_copy`; negative dims become symbolic,
  :func:`symbolic`), which is what every stage that needs fresh shapes calls;
  :func:`static_shapes` infers (falling back to the declared shapes); :func:`complete_shapes` says whether a model's
  declared shapes cover every node output;
* input sizes: :func:`set_input_dims` / :func:`with_input_shapes` write static dims into graph inputs (checked);
* writing: :func:`fresh_name` (a name no tensor of the graph uses yet, with a suffix) and
  :func:`replace_initializers` (new values for node inputs as fresh initializers; originals that no node reads any
  more are dropped; the caller's shared constants are never edited in place);
* layers: :func:`layer_weights` / :func:`write_weights` read and replace the weight and bias of a weighted node;
* identity: :func:`fingerprint`, a cheap hash of a graph's structure (not its weight values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.errors import PreconditionError, UserInputError

Shape = tuple[int | None, ...]

log = logging.getLogger(__name__)

SMALL_CONSTANT = 4096  # initializers up to this many elements stay in the light copy (they feed data propagation)


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Value of a node attribute, or ``default``."""
    for att in node.attribute:
        if att.name == name:
            return onnx.helper.get_attribute_value(att)
    return default


def attrs(node: onnx.NodeProto) -> dict[str, object]:
    """Every attribute of a node by name."""
    return {att.name: onnx.helper.get_attribute_value(att) for att in node.attribute}


def opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def node_name(node: onnx.NodeProto, idx: int) -> str:
    """The node's name, or ``<op_type>_<idx>`` for unnamed nodes."""
    return node.name or f"{node.op_type}_{idx}"


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node outputs (``value`` attribute) by name."""
    table = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            table[node.output[0]] = node.attribute[0].t
    return table


def _dims(info: onnx.ValueInfoProto) -> Shape | None:
    if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                 for d in info.type.tensor_type.shape.dim)


def declared_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes the model declares (graph inputs, ``value_info``, outputs, initializers, Constant outputs);
    ``None`` for symbolic dims and for negative ones (``dim_value: -1``, how Paddle2ONNX writes a dynamic batch).
    No inference is run."""
    graph = model.graph
    shapes: dict[str, Shape] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(info)
        if dims is not None:
            shapes[info.name] = dims
    shapes.update((name, tuple(t.dims)) for name, t in constants(model).items())
    return shapes


def complete_shapes(model: onnx.ModelProto) -> bool:
    """True when the declared shapes cover every node output (a freshly inferred model, e.g. a canonical one)."""
    declared = {info.name for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]
                if _dims(info) is not None}
    return all(out in declared for node in model.graph.node for out in node.output if out)


def infer_shapes_light(model: onnx.ModelProto, small: int = SMALL_CONSTANT, batch: int | None = None) -> onnx.ModelProto:
    """Shape inference (with data propagation) on a copy without large weights; stale ``value_info`` is dropped.

    Initializers with at most ``small`` elements stay (Reshape shapes, Split sizes, scales feed data propagation);
    larger ones become typed graph inputs, so inference never copies the weights. ``batch``: axis 0 of every
    (non-initializer) graph input is set to this size in the copy.
    """
    return onnx.shape_inference.infer_shapes(light_copy(model, small, batch), data_prop=True)


def light_copy(model: onnx.ModelProto, small: int = SMALL_CONSTANT, batch: int | None = None) -> onnx.ModelProto:
    """The model without its large weights: initializers of more than ``small`` elements become typed graph inputs
    (no ``value_info``; ``batch``: axis 0 of every other graph input set to this size), so that shape inference and
    shape folding never copy the weights."""
    graph = model.graph
    declared = {info.name for info in graph.input}
    names = {t.name for t in graph.initializer}
    inits = [t for t in graph.initializer if math.prod(t.dims) <= small]
    typed = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if math.prod(t.dims) > small and t.name not in declared]
    inputs = [symbolic(v) for v in graph.input]
    if batch is not None:
        inputs = [_with_batch(v, batch) if v.name not in names else v for v in inputs]
    light_graph = onnx.helper.make_graph(list(graph.node), graph.name, [*inputs, *typed],
                                         [symbolic(v) for v in graph.output], inits)
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    return light


def symbolic(info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """``info`` itself, or a copy whose negative ``dim_value`` s (a dynamic dim as Paddle2ONNX writes it) are the
    ``dim_param`` ``"<name>_dim<axis>"``: shape inference would otherwise compute with ``-1`` as a size."""
    dims = info.type.tensor_type.shape.dim
    if not any(d.HasField("dim_value") and d.dim_value < 0 for d in dims):
        return info
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    for axis, dim in enumerate(out.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value < 0:
            dim.Clear()
            dim.dim_param = f"{info.name}_dim{axis}"
    return out


def _with_batch(info: onnx.ValueInfoProto, batch: int) -> onnx.ValueInfoProto:
    """A copy of ``info`` whose axis 0 (when it has axes) is ``batch``."""
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    dims = out.type.tensor_type.shape.dim
    if dims:
        dims[0].Clear()
        dims[0].dim_value = batch
    return out


BATCH_MARKER = 13
"""The batch size :func:`batch_leading_dims` gives a model with a symbolic batch (a prime, unlikely elsewhere)."""


def batch_leading_dims(model: onnx.ModelProto) -> tuple[dict[str, int | None], int | None]:
    """Axis 0 of every tensor, inferred with the graph input's batch fixed (to its static size, else
    :data:`BATCH_MARKER`), and that batch: a tensor whose axis 0 equals it holds one sample per row of axis 0 (unlike
    image patches folded into the batch axis). ``({}, None)`` without a single graph input or when inference fails."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.shape.dim:
        return {}, None
    first = inputs[0].type.tensor_type.shape.dim[0]
    batch = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else BATCH_MARKER
    try:
        inferred = infer_shapes_light(model, batch=batch)
    except Exception as err:  # exotic graphs: every tensor counts as not batch-major (conservative)
        log.warning("shape inference with a fixed batch failed (%s); last-axis channels stay frozen", err)
        return {}, None
    return {name: (shape[0] if shape else None) for name, shape in declared_shapes(inferred).items()}, batch


def static_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Freshly inferred shapes (inference on a light copy, constants added); when inference fails, whatever the
    model declares. Stages that already hold fresh shapes (a canonical model's ``value_info``) pass them instead."""
    try:
        inferred = infer_shapes_light(model)
    except Exception as err:  # shape inference may fail on exotic graphs: callers treat unknown shapes conservatively
        log.warning("shape inference failed (%s); tensors without declared shapes count as unknown", err)
        return declared_shapes(model)
    shapes = declared_shapes(inferred)
    shapes.update((name, tuple(t.dims)) for name, t in constants(model).items())
    return shapes


def fresh_name(base: str, taken: set[str], suffix: str) -> str:
    """``<base><suffix>``, or ``<base><suffix><n>``, whichever no name in ``taken`` uses; added to ``taken``."""
    name, n = f"{base}{suffix}", 1
    while name in taken:
        name, n = f"{base}{suffix}{n}", n + 1
    taken.add(name)
    return name


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name of a graph: initializers, node outputs, inputs and outputs."""
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    return names | {v.name for v in [*graph.input, *graph.output]}


def replace_initializers(model: onnx.ModelProto, values: Mapping[tuple[int, int], np.ndarray], suffix: str) -> None:
    """Give input ``pos`` of node ``idx`` a new initializer for every ``(idx, pos) -> value``, in place.

    New initializers are named ``<old input name><suffix>`` (made unique). An initializer that only this slot reads
    is replaced in its list slot (no list rebuild for large models); a shared one gets a new entry and keeps serving
    its other readers. Originals that no node reads any more are dropped; graph inputs and outputs are kept.
    """
    graph = model.graph
    taken = graph_names(graph)
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    slot = {t.name: i for i, t in enumerate(graph.initializer)}
    declared = {info.name for info in graph.input}
    for (node_idx, pos), value in sorted(values.items()):
        node = graph.node[node_idx]
        while len(node.input) <= pos:
            node.input.append("")
        old = node.input[pos]
        base = old or f"{node.name or node.op_type}_{'bias' if pos == 2 else f'input{pos}'}"
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), fresh_name(base, taken, suffix))
        if old and old in slot and uses.get(old) == 1 and old not in declared:
            graph.initializer[slot.pop(old)].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
        if old:
            uses[old] -= 1
        node.input[pos] = tensor.name
    graph_io = {info.name for info in [*graph.input, *graph.output]}
    _drop_initializers(graph, [slot[n] for n in slot if uses.get(n, 0) == 0 and n not in graph_io])


def _drop_initializers(graph: onnx.GraphProto, positions: Iterable[int]) -> None:
    for i in sorted(positions, reverse=True):
        del graph.initializer[i]


_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                  onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16, onnx.TensorProto.UINT8,
                  onnx.TensorProto.BOOL}


def fingerprint(model: onnx.ModelProto) -> str:
    """A cheap identity of a graph's structure: nodes (with attributes), graph inputs and outputs, initializer
    names, types and shapes, and the values of small integer initializers (shape vectors, split sizes, slice
    bounds, axes, pads: what analysis decisions read). Float values (weights, biases) are not read, so a model
    whose weights were refit keeps its fingerprint."""
    import hashlib

    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for info in [*graph.input, *graph.output]:
        digest.update(info.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        digest.update(f"{tensor.name}:{tensor.data_type}:{tuple(tensor.dims)}".encode())
        if math.prod(tensor.dims) <= 64 and tensor.data_type in _INTEGER_TYPES:
            digest.update(numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()


def node_index(model: onnx.ModelProto, name: str) -> int:
    """Index in ``graph.node`` of the node called ``name`` (unnamed nodes: ``<op_type>_<index>``).

    Raises:
        PreconditionError: no such node.
    """
    for idx, node in enumerate(model.graph.node):
        if node_name(node, idx) == name:
            return idx
    raise PreconditionError(f"the model has no node '{name}'")


def layer_weights(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
    """The node's weight (input 1) and bias (input 2, None when absent) initializers as arrays.

    Raises:
        PreconditionError: the weight (or an existing bias) is not an initializer.
    """
    inits = {t.name: t for t in model.graph.initializer}
    if len(node.input) < 2 or node.input[1] not in inits:
        raise PreconditionError(f"{node.op_type} '{node.name}': weight is not an initializer")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            raise PreconditionError(f"{node.op_type} '{node.name}': bias is not an initializer")
        bias = numpy_helper.to_array(inits[node.input[2]])
    return numpy_helper.to_array(inits[node.input[1]]), bias


def write_weights(model: onnx.ModelProto, idx: int, weight: np.ndarray, bias: np.ndarray | None,
                  suffix: str = "__recovered") -> None:
    """Replace the weight (input 1) and, unless ``bias`` is None, the bias (input 2) of node ``idx``, in place.

    New values go to fresh initializers ``<old><suffix>`` (:func:`replace_initializers`: originals no node reads
    any more are dropped; a missing bias is created). The weight keeps its shape.

    Raises:
        PreconditionError: the weight is not an initializer of ``weight``'s shape.
    """
    node = model.graph.node[idx]
    old = next((t for t in model.graph.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
    if old is None or tuple(old.dims) != weight.shape:
        raise PreconditionError(f"layer '{node.name}': weight is not an initializer of shape {weight.shape}")
    values = {(idx, 1): weight}
    if bias is not None:
        values[(idx, 2)] = bias
    replace_initializers(model, values, suffix)


def named_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with the name ``""`` (dims given without a name) replaced by the model's single input's name.

    Raises:
        UserInputError: dims without a name for a model with several inputs.
    """
    out = {name: tuple(int(d) for d in dims) for name, dims in shapes.items() if name}
    if "" in shapes:
        inits = {t.name for t in model.graph.initializer}
        inputs = [info.name for info in model.graph.input if info.name not in inits]
        if len(inputs) != 1:
            raise UserInputError(f"--input-shape without a name fits a model with one input; this one has {inputs}: "
                                 "give NAME:DIMS")
        if inputs[0] in out:
            raise UserInputError(f"--input-shape gives input '{inputs[0]}' twice (with and without its name)")
        out[inputs[0]] = tuple(int(d) for d in shapes[""])
    return out


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``shapes`` have those static dims (``value_info`` re-inferred
    with data propagation, so that constant folding can evaluate shape chains for these sizes); the name ``""``
    stands for the model's single input.

    Raises:
        UserInputError: an unknown input name, a rank that differs, or a dim that contradicts a static one.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    set_input_dims(out, named_input_shapes(model, shapes))
    del out.graph.value_info[:]
    try:  # fresh shapes (with data propagation) let constant folding resolve shape chains for these sizes
        out.graph.value_info.extend(infer_shapes_light(out).graph.value_info)
    except Exception as err:  # inference may fail on exotic graphs: canonicalization infers again anyway
        log.warning("shape inference with the given input shapes failed (%s)", err)
    return out


def set_input_dims(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], *,
                   inputs: Iterable[str] | None = None) -> None:
    """Write static dims into the graph inputs named in ``shapes``, in place (a dynamic dim: symbolic, unset or
    negative, takes any size; a static one must be given as it is). ``inputs``: the names the model's user knows as
    its inputs (default: the graph inputs that are not initializers), for the error message.

    Raises:
        UserInputError: an unknown input name, a rank that differs, or a dim that contradicts a static one.
    """
    inits = {t.name for t in model.graph.initializer}
    by_name = {info.name: info for info in model.graph.input if info.name not in inits}
    known = sorted(by_name if inputs is None else inputs)
    for name, dims in shapes.items():
        if name not in known:
            raise UserInputError(f"--input-shape names input '{name}', the model has inputs {known}")
        shape = by_name[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise UserInputError(f"--input-shape {name}: the input has rank {len(shape.dim)}, got {len(dims)} dims")
        for axis, (dim, value) in enumerate(zip(shape.dim, dims, strict=True)):
            if dim.HasField("dim_value") and dim.dim_value >= 0 and dim.dim_value != value:
                raise UserInputError(f"--input-shape {name}: dim {axis} is fixed to {dim.dim_value} in the model, "
                                     f"got {value}")
            dim.Clear()
            dim.dim_value = int(value)
