"""The spine of a run: a model file loaded, canonicalized and analysed once, then handed to every stage.

:func:`prepare` reads the file (clear errors for every way it can be wrong), hashes it (the identity plans and
statistics record), canonicalizes it (:func:`graph_ops.canonicalize.canonicalize`: the only two shape inferences of
a run happen there) and analyses the canonical graph with the shapes canonicalization just inferred, or, with
``input_shapes``, with every tensor's shape at those input sizes (:func:`graph_ops.dynamic_dims.shapes_at`). The
canonical model itself keeps every dim the file declares dynamic (a negative ``dim_value`` becomes a ``dim_param``;
:meth:`PreparedModel.restore_io` writes the file's own input and output dims back into a pruned model), so the
pruned model serves any batch and any size the original serves, and calibration and recovery feed whole batches.
The resulting
:class:`PreparedModel` carries the analysis (:class:`~graph_ops.groups.ChannelGroupIndex`: groups, the edits a plan
implies, static shapes, the graph's fingerprint), so surgery, the mask oracle, recovery, the cost counter and the
scorers never analyse or infer shapes again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze, producer_weights
from graph_ops.cost import CostReport, count
from graph_ops.dynamic_dims import graph_io, shapes_at, symbolic_dims, with_io_dims
from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import check_finite_weights, load_model, sha256_file
from graph_ops.proto import (
    Shape,
    complete_shapes,
    declared_shapes,
    named_input_shapes,
    node_name,
    set_input_dims,
    static_shapes,
)
from pipeline.data.task import Task
from pipeline.errors import UserInputError


@dataclass(frozen=True)
class Layer:
    """A layer that reads channels (an exit consumer: Conv with group 1, ConvTranspose, Gemm, MatMul), in the
    form the tracing scorers need: its weight initializer, the weight axis of its input channels, the columns per
    channel (``H*W`` after a channel-major Flatten, else 1), the tensor whose channels it reads and its output."""

    name: str
    weight: str
    axis: int
    block: int
    input: str
    output: str


@dataclass(frozen=True)
class PreparedModel:
    """A model loaded once: its file identity, its canonical graph and its analysis.

    Attributes:
        path: the model file (never modified).
        sha256: sha256 of the file's bytes.
        model: the canonical model (what analysis, calibration, surgery and recovery work on).
        index: ``analyze(model)``: channel groups, edits, static shapes, fingerprint.
        input_shapes: the static input dims analysis and the cost model used (empty: as in the file); the
            canonical model keeps its dynamic dims.
        task: the task whose head the canonical model carries (:mod:`pipeline.data.task`), or None.
        io: the file's own graph inputs and outputs (:func:`graph_ops.dynamic_dims.graph_io`), which
            :meth:`restore_io` writes back into a pruned model.
        sizes: the input sizes analysis used: ``input_shapes``, or, for a model whose only dynamic dim is the batch
            and whose shape inference leaves sizes unknown (shape chains through ``Shape``), every input at batch 1;
            empty: the declared shapes.
    """

    path: Path
    sha256: str
    model: onnx.ModelProto
    index: ChannelGroupIndex
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    task: Task | None = None
    io: tuple[onnx.ValueInfoProto, ...] = ()
    sizes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def weights(self) -> dict[str, np.ndarray]:
        """Initializers as numpy arrays (for the data-free scorers)."""
        return {init.name: numpy_helper.to_array(init) for init in self.model.graph.initializer}

    @cached_property
    def cost(self) -> CostReport:
        """MACs and params of the canonical model (counted once, on the analysis's shapes)."""
        return count(self.model, self.index.shapes)

    def shapes_of(self, model: onnx.ModelProto) -> dict[str, Shape]:
        """Static shapes of a model of this run (the canonical one, a pruned or recovered one) at the prepared input
        sizes (:func:`graph_ops.dynamic_dims.shapes_at`), or, when none were given, its declared shapes (inferred
        when they do not cover every node output)."""
        if self.sizes:
            return shapes_at(model, self.sizes)
        return declared_shapes(model) if complete_shapes(model) else static_shapes(model)

    def count(self, model: onnx.ModelProto) -> CostReport:
        """MACs and params of a model of this run at the prepared input sizes (:meth:`shapes_of`)."""
        return count(model, self.shapes_of(model))

    def restore_io(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (derived from :attr:`model`) with the file's own input and output dims wherever the file
        declares them dynamic (in place; see :func:`graph_ops.dynamic_dims.with_io_dims`)."""
        return with_io_dims(model, self.io)

    def at_sizes(self, model: onnx.ModelProto) -> bytes:
        """``model`` (derived from :attr:`model`) serialized with the prepared input sizes written into its inputs
        (the dims ``--input-shape`` gave; a dynamic batch stays dynamic): what the latency benchmarks run, which need
        static sizes besides the batch. The model itself is not changed."""
        if not self.input_shapes:
            return model.SerializeToString()
        sized = onnx.ModelProto()
        sized.CopyFrom(model)
        inputs = {info.name: info for info in sized.graph.input}
        for name, dims in self.input_shapes.items():
            for dim, value in list(zip(inputs[name].type.tensor_type.shape.dim, dims, strict=True))[1:]:
                dim.Clear()
                dim.dim_value = int(value)
        return sized.SerializeToString()

    @property
    def input_specs(self) -> dict[str, tuple[tuple[int | None, ...], np.dtype]]:
        """The inputs data must fit: the canonical model's (dynamic dims ``None``), with every dim but the batch
        set to the prepared input sizes (calibration data must have the sizes analysis used; the batch stays free
        when the model's is dynamic)."""
        from pipeline.model.runtime import model_input_specs

        specs = model_input_specs(self.model)
        for name, fixed in self.input_shapes.items():
            shape, dtype = specs[name]
            if len(fixed) == len(shape) and shape:
                specs[name] = ((shape[0], *fixed[1:]), dtype)
        return specs

    @cached_property
    def producer_weights(self) -> dict[str, tuple[str, int, str]]:
        """Producer node -> (weight initializer, output-channel axis, layout tensor), read off the analysis's edits."""
        return producer_weights(self.model, self.index)

    @cached_property
    def layers(self) -> tuple[Layer, ...]:
        """Every layer that reads channels (its consumer edit of the weight), topological order."""
        found = []
        for edit in self.index.edits:
            if edit.role == "consumer" and edit.kind == "take" and edit.pos == 1:
                node = self.model.graph.node[edit.node]
                found.append(Layer(node_name(node, edit.node), node.input[1], edit.axis, edit.block, edit.tensor,
                                   node.output[0]))
        return tuple(found)

    @property
    def probes(self) -> tuple[str, ...]:
        """All probes of all prunable groups, in topological group order, without repeats."""
        return default_probes(self.index)


def default_probes(index: ChannelGroupIndex) -> tuple[str, ...]:
    """All probes of all prunable groups of an analysis, in topological group order, without repeats."""
    return tuple(dict.fromkeys(p for group in index.groups if group.prunable for p in group.probes))


InputShapes = Mapping[str, tuple[int, ...]]


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["images:1x3x640x640", ...]`` (the CLI's repeatable ``--input-shape [NAME:]DIMS``) ->
    ``{"images": (1, 3, 640, 640)}``; DIMS without a name is the model's single input (key ``""``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            values = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            values = ()
        if (sep and not name) or not values or min(values) < 1:
            raise UserInputError(f"--input-shape {spec!r}: expected [NAME:]DIMS with positive dims, e.g. "
                                 f"images:1x3x640x640 (or 1x3x640x640 for a single-input model)")
        if name in shapes:
            raise UserInputError(f"--input-shape names input '{name or '(the single input)'}' twice")
        shapes[name] = values
    return shapes


def prepare(path: str | os.PathLike[str], input_shapes: InputShapes | None = None, *,
            task: Task | None = None) -> PreparedModel:
    """Load, hash, canonicalize and analyse a model file (see the module docstring); with a ``task``, the model's
    first output is rewritten into the task's scores first (:meth:`pipeline.data.task.Task.head`).

    Args:
        path: the model file (never modified).
        input_shapes: static dims for graph inputs (``{"images": (1, 3, 640, 640)}``) that analysis, the cost model
            and calibration data use (:func:`graph_ops.dynamic_dims.shapes_at`); the canonical model, and so the
            pruned one, keeps the dims the file declares dynamic.
        task: a task (:mod:`pipeline.data.task`) whose head replaces the first output (after the input shapes).

    Raises:
        UserInputError: a missing or unreadable file, an input shape that does not fit the model, or a task that
            does not fit the model's output.
        PassError, VerificationError: canonicalization failed (the message names the pass).
    """
    path = Path(path)
    model = load_model(path)
    check_finite_weights(model, path)
    sha = sha256_file(path)
    io = graph_io(model)
    model = symbolic_dims(model)
    if input_shapes:  # the checks only: the sizes go to analysis, not into the model
        input_shapes = named_input_shapes(model, input_shapes)
        set_input_dims(_inputs_only(model), input_shapes)
    if task is not None:
        model = task.head(model)
    canonical = canonicalize(model)
    sizes = dict(input_shapes or {}) or batch_one(canonical)
    shapes = shapes_at(canonical, sizes) if sizes else declared_shapes(canonical)
    return PreparedModel(path=path, sha256=sha, model=canonical, index=analyze(canonical, shapes),
                         input_shapes=dict(input_shapes or {}), task=task, io=io, sizes=sizes)


def batch_one(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every graph input at batch 1 when the batch is its only dynamic dim and the model's declared shapes leave the
    size of some Conv / Gemm / MatMul output unknown (sizes computed through ``Shape`` that inference does not resolve
    while the batch is unknown: TF "same" padding, a shuffle's views); else ``{}`` (the declared shapes are all
    analysis and the cost model need)."""
    declared = declared_shapes(model)
    if all(node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or (
            declared.get(node.output[0]) is not None and None not in declared[node.output[0]][1:])
           for node in model.graph.node):
        return {}
    inits = {t.name for t in model.graph.initializer}
    sizes = {}
    for info in model.graph.input:
        if info.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in info.type.tensor_type.shape.dim]
        if not dims or None in dims[1:]:
            return {}
        sizes[info.name] = (1, *dims[1:])
    return sizes


def _inputs_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model holding copies of ``model``'s graph inputs only (for checks that must not copy the weights)."""
    inits = {t.name for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.graph.input.extend(info for info in model.graph.input if info.name not in inits)
    return out


def as_prepared(model: PreparedModel | str | os.PathLike[str], input_shapes: InputShapes | None = None, *,
                task: Task | None = None) -> PreparedModel:
    """A prepared model as it is (its task must be ``task`` when one is given), or a model file prepared (with
    ``input_shapes`` and ``task``)."""
    if not isinstance(model, PreparedModel):
        return prepare(model, input_shapes, task=task)
    if task is not None and model.task != task:
        raise UserInputError(f"the prepared model carries task {model.task and model.task.to_dict()}, not "
                             f"{task.to_dict()}; prepare it with the task")
    return model
