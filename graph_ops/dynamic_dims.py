"""Dynamic input dims: what analysis fixes, and what the pruned model keeps.

A model declares a dim *dynamic* when it gives no static size: a ``dim_param`` (``"batch"``), nothing at all, or a
negative ``dim_value`` (Paddle2ONNX writes a dynamic batch as ``-1``). Analysis and the cost model need static sizes
(a Conv's MACs grow with its output's height and width; a Flatten -> Gemm head's block is ``H*W``), which the user
gives per input (``--input-shape x:1x3x48x320``). Those sizes are *for analysis only*: the model that is calibrated,
pruned and written keeps every dim the original declared dynamic, so a pruned text recognizer still reads lines of
any width and serves any batch.

* :func:`symbolic_dims`: negative ``dim_value`` s become ``dim_param`` s, so that ONNX shape inference treats them
  as unknown (a literal ``-1`` would flow through ``Shape`` into shape arithmetic as a number);
* :func:`shapes_at`: every tensor's shape when the inputs have the given static sizes, read off a light copy of the
  model (no weights) whose input dims are fixed and whose shape chains are folded
  (:func:`graph_ops.canonical_passes.fold_shape_chains`). The model itself is not changed, so nothing in it is
  specialised to these sizes;
* :func:`with_io_dims`: the graph inputs' and outputs' dims of a reference model (the file as shipped) written back
  where the reference declares them dynamic, in place.

Why this is exact: channel analysis reads the static sizes to decide what a node does (a Reshape that flattens, a
Flatten's block), and only accepts shape arithmetic it can follow for every input size (:mod:`graph_ops.
channel_shape_rules`: batch and spatial entries flow freely, a channel count only where surgery rewrites it). The
rewrites surgery applies change channel counts only, never a batch or spatial size, so the pruned model computes,
at every input size where the original runs, what the original computes with the removed channels' exit weights
zeroed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import onnx

from graph_ops.proto import Shape, declared_shapes, light_copy, set_input_dims, symbolic

log = logging.getLogger(__name__)


def _value_infos(model: onnx.ModelProto) -> Iterable[onnx.ValueInfoProto]:
    graph = model.graph
    return [*graph.input, *graph.output, *graph.value_info]


def symbolic_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every negative ``dim_value`` of its inputs, outputs and ``value_info`` turned into the
    ``dim_param`` ``"<tensor>_dim<axis>"`` (:func:`graph_ops.proto.symbolic`; the model itself when it has none,
    otherwise a copy)."""
    if all(symbolic(info) is info for info in _value_infos(model)):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for info in _value_infos(out):
        info.CopyFrom(symbolic(info))
    return out


def is_dynamic(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """True for a dim without a static size (``dim_param``, unset, or a negative ``dim_value``)."""
    return not dim.HasField("dim_value") or dim.dim_value < 0


def graph_io(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, ...]:
    """Copies of a model's graph inputs (initializers excluded) and outputs: what :func:`with_io_dims` restores."""
    inits = {t.name for t in model.graph.initializer}
    infos = [info for info in model.graph.input if info.name not in inits] + list(model.graph.output)
    copies = []
    for info in infos:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(info)
        copies.append(copy)
    return tuple(copies)


def with_io_dims(model: onnx.ModelProto, reference: Sequence[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """Give the graph inputs and outputs of ``model`` the dims of the same-named ``reference`` ones wherever the
    reference declares a dim dynamic (in place; returns ``model``). Static dims of ``model`` stay; an input or
    output of another rank, or one the reference does not have, is left as it is."""
    by_name = {info.name: info for info in reference}
    for info in [*model.graph.input, *model.graph.output]:
        ref = by_name.get(info.name)
        if ref is None or not ref.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        ref_dims = ref.type.tensor_type.shape.dim
        if len(dims) != len(ref_dims):
            continue
        for dim, ref_dim in zip(dims, ref_dims, strict=True):
            if is_dynamic(ref_dim):
                dim.CopyFrom(ref_dim)
    return model


def shapes_at(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
    """Every tensor's static shape when the graph inputs have ``input_shapes`` (see the module docstring): the
    model's own declared shapes, overridden by those of a light copy with the inputs fixed and its shape chains
    folded; ``model`` is not changed.

    Raises:
        UserInputError: an unknown input name, a rank that differs, or a dim that contradicts a static one.
    """
    from graph_ops.canonical_passes import fold_shape_chains  # onnx-graphsurgeon: only when sizes are fixed

    inits = {t.name for t in model.graph.initializer}
    light = light_copy(model)
    set_input_dims(light, input_shapes, inputs=[i.name for i in model.graph.input if i.name not in inits])
    del light.graph.value_info[:]
    shapes = declared_shapes(model)
    try:
        folded = fold_shape_chains(light)
        inferred = onnx.shape_inference.infer_shapes(folded, data_prop=True)
    except Exception as err:  # exotic graphs: the declared shapes (dynamic dims unknown) are what analysis gets
        log.warning("shape inference at the given input sizes failed (%s); dynamic dims stay unknown", err)
        return shapes
    shapes.update(declared_shapes(inferred))
    return shapes
