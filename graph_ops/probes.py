"""Expose intermediate tensors of a model as extra graph outputs (the probes that calibration measures).

``expose_tensors(model, names)`` returns a *copy* of the model whose graph outputs are the original outputs, in their
original order, followed by the requested tensors in the order given (duplicates and tensors that already are
outputs are listed once). The graph itself (nodes, initializers) is untouched, so every original output is computed
exactly as before; onnxruntime simply keeps the extra tensors alive and returns them.

Each new output carries the element type and shape of the tensor's declared ``value_info`` or, when it has none, the
one found by ``onnx.shape_inference`` (symbolic dimensions such as a dynamic batch stay symbolic). Preconditions: every name is produced by a node of the main graph or is a graph input
(tensors inside If/Loop bodies cannot be exposed), and its element type can be inferred; otherwise a clear error
names the tensor and, for a typo, the closest existing names.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable

import onnx
from onnx import shape_inference

from graph_ops.errors import PreconditionError, UserInputError

logger = logging.getLogger(__name__)


def _known_tensors(graph: onnx.GraphProto) -> list[str]:
    """Names that can become outputs: graph inputs and node outputs of the main graph, in graph order."""
    names = [vi.name for vi in graph.input]
    names += [out for node in graph.node for out in node.output if out]
    return names


def _typed_value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """Declared value infos of the main graph that carry an element type."""
    return {vi.name: vi for vi in (*graph.input, *graph.value_info, *graph.output)
            if vi.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED}


def _value_infos(model: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """Type/shape of the named tensors: declared ones, else from shape inference (never raises on gaps)."""
    infos = _typed_value_infos(model.graph)
    if all(name in infos for name in names):
        return infos  # canonical models carry fresh value_info: no need to run inference again
    try:
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as err:  # inference failure is not fatal: the declared value_info may still suffice
        logger.warning("shape inference failed while exposing probes (%s); using declared types only", err)
        return infos
    return {**infos, **_typed_value_infos(inferred.graph)}


def _check_names(names: list[str], known: list[str]) -> None:
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; list tensors with 'diprune inspect'"
            raise UserInputError(f"cannot expose tensor '{name}': no node of the model's main graph produces it "
                                 f"and it is not a graph input{hint}")


def expose_tensors(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Return a copy of ``model`` with the named intermediate tensors added as graph outputs.

    Args:
        model: the model (not modified).
        names: tensor names to expose, in the order they should appear after the original outputs.

    Returns:
        A new ModelProto whose outputs are the original outputs followed by the new ones.

    Raises:
        UserInputError: a name is not a tensor of the main graph.
        PreconditionError: the element type of a tensor cannot be inferred.
    """
    wanted = list(dict.fromkeys(names))
    graph = model.graph
    _check_names(wanted, _known_tensors(graph))
    present = {vi.name for vi in graph.output}
    missing = [name for name in wanted if name not in present]
    result = onnx.ModelProto()
    result.CopyFrom(model)
    if not missing:
        return result
    infos = _value_infos(model, missing)
    for name in missing:
        info = infos.get(name)
        if info is None:
            raise PreconditionError(f"cannot expose tensor '{name}': its element type could not be inferred "
                                    f"(run shape inference or add a value_info entry for it)")
        out = result.graph.output.add()
        out.CopyFrom(info)
    logger.debug("exposed %d tensors as outputs", len(missing))
    return result
