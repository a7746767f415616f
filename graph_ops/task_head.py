"""Task heads: a classifier's output restricted to the classes of the user's task, as graph rewrites.

* :func:`restrict_classes` keeps the logits of ``classes`` (in the order given) of the model's first output
  ``(N, K)``. When that output is written directly by a dense layer with constant weights (Gemm, MatMul with an
  optional ``Add`` of a constant bias), the layer's output rows and bias entries are sliced (the layer computes only
  the task's logits; exact: ``y'[:, i] = y[:, classes[i]]``). Otherwise (softmax or any other op in front of the
  output) a ``Gather(axis=1)`` of the classes is appended, which is exact too.
* :func:`group_classes` forms one output per group of classes (``{"odd": [1, 3, 5, 7, 9], "even": [...]}``), in the
  order given: for logits ``z``, ``t_g = log Σ_{k ∈ g} exp(z_k)`` (``ReduceLogSumExp``), so that
  ``softmax(t)_g = Σ_{k ∈ g} softmax(z)_k``: the group's probability is the sum of its members' probabilities and the
  predicted group is the one holding the most probability mass (not the group of the single largest logit). When the
  output is already probabilities (a ``Softmax`` writes it) the members are summed (``ReduceSum``); after a
  ``LogSoftmax`` the log-sum-exp of the members' log-probabilities is the group's log-probability.

Both keep the output's name (its width changes: the interface change is deliberate) and record the task in the
model's metadata (:data:`TASK_KEY`, JSON with the original output name, its width and the classes or groups), so a
model that already carries a task head is recognised and never restricted twice. The input model is not modified.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.errors import UserInputError
from graph_ops.proto import attr, fresh_name, graph_names, opset

TASK_KEY = "diprune.task"


def model_task(model: onnx.ModelProto) -> dict | None:
    """The task recorded in a model's metadata (None for a model without a task head)."""
    for prop in model.metadata_props:
        if prop.key == TASK_KEY:
            return json.loads(prop.value)
    return None


def _output_width(model: onnx.ModelProto) -> int:
    out = model.graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise UserInputError(f"a task head needs class scores (N, K) with a static K as the first output; "
                             f"'{out.name}' has shape {[d.dim_value or d.dim_param or '?' for d in dims]}")
    return int(dims[1].dim_value)


def _check_classes(classes: Sequence[int], width: int, what: str) -> list[int]:
    chosen = [int(c) for c in classes]
    bad = [c for c in chosen if not 0 <= c < width]
    if not chosen or bad:
        raise UserInputError(f"{what}: class ids must lie in 0..{width - 1} (the model has {width} outputs); got "
                             f"{bad or 'none'}")
    if len(set(chosen)) != len(chosen):
        raise UserInputError(f"{what}: a class is listed twice ({chosen})")
    return chosen


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((node for node in graph.node if name in node.output), None)


def _no_head(model: onnx.ModelProto) -> None:
    if model_task(model) is not None:
        raise UserInputError("the model already has a task head (metadata 'diprune.task'); give the original model")


def _record(model: onnx.ModelProto, task: dict) -> None:
    model.metadata_props.add(key=TASK_KEY, value=json.dumps(task, sort_keys=True))


def _set_width(model: onnx.ModelProto, width: int) -> None:
    graph = model.graph
    name = graph.output[0].name
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = width
    keep = [info for info in graph.value_info if info.name != name]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _dense_head(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, int, int]] | None:
    """The constants to slice when a dense layer writes the first output: ``(node, input position, axis)`` of the
    weight and of a per-class bias; None when the output is written any other way."""
    consts = {t.name: t for t in graph.initializer}
    node = _producer(graph, graph.output[0].name)
    if node is None:
        return None
    if node.op_type == "Gemm" and not attr(node, "transA", 0) and node.input[1] in consts:
        slots = [(node, 1, 0 if attr(node, "transB", 0) else 1)]
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                return None
            slots.append((node, 2, -1))
        return slots
    add, bias = None, None
    if node.op_type == "Add":
        inner = [i for i in node.input if i not in consts]
        const = [(pos, i) for pos, i in enumerate(node.input) if i in consts]
        matmul = _producer(graph, inner[0]) if len(inner) == 1 and len(const) == 1 else None
        if matmul is None or matmul.op_type != "MatMul" or sum(list(n.input).count(inner[0]) for n in graph.node) != 1:
            return None
        add, bias, node = node, const[0][0], matmul
    if node.op_type != "MatMul" or node.input[1] not in consts or len(consts[node.input[1]].dims) != 2:
        return None
    return [(node, 1, 1)] + ([(add, bias, -1)] if add is not None else [])


def _slice_dense(model: onnx.ModelProto, classes: list[int], width: int) -> bool:
    """Slice the output rows (and per-class bias) of the dense layer writing the first output; False if none."""
    graph = model.graph
    slots = _dense_head(graph)
    if slots is None:
        return False
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    new = []
    for node, pos, axis in slots:
        value = values[node.input[pos]]
        if axis == -1 and value.size == 1:
            continue  # a scalar bias is the same for every class
        if value.shape[axis] != width or (axis == -1 and value.size != width):
            return False
        new.append((node, pos, np.take(value, classes, axis=axis)))
    taken = graph_names(graph)
    for node, pos, value in new:
        name = fresh_name(node.input[pos], taken, "__task")
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        node.input[pos] = name
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return True


def _append(model: onnx.ModelProto, make: list[tuple[str, list[str], dict]], source_suffix: str) -> None:
    """Rename the first output's producer output to ``<out><suffix>`` and append nodes that write ``<out>``."""
    graph = model.graph
    out = graph.output[0].name
    taken = graph_names(graph)
    source = fresh_name(out, taken, source_suffix)
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = source
        for i, name in enumerate(node.input):
            if name == out:
                node.input[i] = source
    for op, inputs, attrs in make:
        target = attrs.pop("_output")
        graph.node.append(onnx.helper.make_node(op, [source if i == "@source" else i for i in inputs], [target],
                                                name=fresh_name(f"{out}_{op.lower()}", taken, ""), **attrs))


def restrict_classes(model: onnx.ModelProto, classes: Sequence[int]) -> onnx.ModelProto:
    """A copy of ``model`` whose first output holds only the scores of ``classes``, in that order (module docstring).

    Raises:
        UserInputError: the first output is not ``(N, K)``, a class is out of range or repeated, or the model
            already has a task head.
    """
    _no_head(model)
    width = _output_width(model)
    chosen = _check_classes(classes, width, "--task-classes")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name = out.graph.output[0].name
    if not _slice_dense(out, chosen, width):
        index = fresh_name(f"{name}_task_classes", graph_names(out.graph), "")
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(chosen, np.int64), index))
        _append(out, [("Gather", ["@source", index], {"axis": 1, "_output": name})], "__all_classes")
    _set_width(out, len(chosen))
    _record(out, {"kind": "classes", "output": name, "width": width, "classes": chosen})
    return out


def _reduce(model: onnx.ModelProto, op: str, source: str, output: str, taken: set[str]) -> list[tuple]:
    """``op`` over axis 1 with kept dims (axes as an input from opset 13 for ReduceSum, 18 for the others)."""
    if opset(model) >= (13 if op == "ReduceSum" else 18):
        axes = fresh_name(f"{output}_axes", taken, "")
        model.graph.initializer.append(numpy_helper.from_array(np.asarray([1], np.int64), axes))
        return [(op, [source, axes], {"keepdims": 1, "_output": output})]
    return [(op, [source], {"axes": [1], "keepdims": 1, "_output": output})]


def group_classes(model: onnx.ModelProto, groups: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose first output holds one score per group of classes, in the order given (module
    docstring: log-sum-exp of member logits, or the sum of member probabilities after a Softmax).

    Raises:
        UserInputError: fewer than two groups, an empty group, a class out of range or in two groups, a first
            output that is not ``(N, K)``, or a model that already has a task head.
    """
    _no_head(model)
    width = _output_width(model)
    if len(groups) < 2:
        raise UserInputError(f"--task-map needs at least two groups of classes, got {len(groups)}")
    members = {str(g): _check_classes(c, width, f"--task-map group '{g}'") for g, c in groups.items()}
    flat = [c for chosen in members.values() for c in chosen]
    if len(set(flat)) != len(flat):
        raise UserInputError("--task-map: a class belongs to two groups; every class may be in one group at most")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    name = graph.output[0].name
    producer = _producer(graph, name)
    probabilities = producer is not None and producer.op_type == "Softmax"
    op = "ReduceSum" if probabilities else "ReduceLogSumExp"
    taken = graph_names(graph) | {f"{name}__grouped_source"}
    nodes: list[tuple] = []
    parts = []
    for group, chosen in members.items():
        index = fresh_name(f"{name}_{group}_classes", taken, "")
        graph.initializer.append(numpy_helper.from_array(np.asarray(chosen, np.int64), index))
        picked, reduced = fresh_name(f"{name}_{group}_members", taken, ""), fresh_name(f"{name}_{group}", taken, "")
        nodes.append(("Gather", ["@source", index], {"axis": 1, "_output": picked}))
        nodes += _reduce(out, op, picked, reduced, taken)
        parts.append(reduced)
    nodes.append(("Concat", parts, {"axis": 1, "_output": name}))
    _append(out, nodes, "__grouped_source")
    _set_width(out, len(members))
    _record(out, {"kind": "groups", "output": name, "width": width, "groups": [[g, m] for g, m in members.items()],
                  "reduction": "sum of probabilities" if probabilities else "log-sum-exp"})
    return out

