"""Expose intermediate tensors of a model as extra graph outputs, raw or pooled inside the graph.

``add_pooled_probes(model, names)`` (what calibration runs) appends, right after each probe's producer, nodes that
reduce the probe to per-channel float64 sums (global, or over K x K bins), optional nonzero counts and absolute sums,
and its shape, and returns those as its only outputs: onnxruntime hands back ``O(N C)`` numbers per probe, not the
activation, and reduces each probe as soon as it exists. Its docstring has the math and the node order.

``add_location_views(model, views)`` (what location-aware calibration runs) appends per probe its channels-first
view for per-location statistics (the probe, its height mean, or its mean), optionally gathered inside the graph at
positions fed as an extra input, and keeps the original outputs it is asked to (the output the labels are read from).

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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from graph_ops.errors import PreconditionError, UserInputError
from graph_ops.proto import declared_shapes, fresh_name, graph_names, opset, static_shapes

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


@dataclass(frozen=True)
class PooledProbe:
    """The outputs that :func:`add_pooled_probes` adds for one probe tensor ``x`` of shape ``(N, C, *spatial)``.

    Attributes:
        tensor: the probe tensor.
        shape: output with ``Shape(x)`` (int64), so the spatial size is known at run time.
        sums: output with float64 sums over the spatial positions: ``(N, C)``, or ``(N, C, K, K)`` bin sums.
        nonzero: output with the float64 count of nonzero entries per ``(N, C)`` (None without summaries).
        abs_sum: output with float64 ``Σ|x|`` per ``(N, C)`` (None without summaries).
        bin_sizes: ``(K*K,)`` positions per bin for ``K > 1`` (row-major bins), else None.
    """

    tensor: str
    shape: str
    sums: str
    nonzero: str | None
    abs_sum: str | None
    bin_sizes: tuple[int, ...] | None = None


def adaptive_bins(length: int, k: int) -> list[tuple[int, int]]:
    """Bin edges of K-bin adaptive average pooling along one axis (as torch's AdaptiveAvgPool):
    bin ``i`` covers ``[floor(i L / K), ceil((i + 1) L / K))``."""
    return [((i * length) // k, -((-(i + 1) * length) // k)) for i in range(k)]


class _Builder:
    """Nodes, constants and outputs appended for the pooled probes (names made unique)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.opset = opset(model)
        self.taken = graph_names(model.graph)
        self.nodes: dict[str, list[onnx.NodeProto]] = {}  # probe tensor -> its pooling nodes
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def name(self, base: str) -> str:
        return fresh_name(base, self.taken, "")

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, tensor: str, op: str, inputs: list[str], base: str, **attrs: object) -> str:
        out = self.name(base)
        self.nodes.setdefault(tensor, []).append(onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, tensor: str, op: str, x: str, axes: list[int], base: str) -> str:
        """``op`` over ``axes`` without keepdims; axes as an input where the opset wants it (ReduceSum from 13, the
        other reductions from 18), else as an attribute."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(tensor, op, [x, self.const(f"{tensor}__probe_axes", np.asarray(axes, np.int64))], base,
                             keepdims=0)
        return self.node(tensor, op, [x], base, axes=axes, keepdims=0)

    def output(self, name: str, elem_type: int) -> str:
        self.outputs.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        return name


def _spatial_sum(b: _Builder, x: str, source: str, rank: int, base: str, op: str = "ReduceSum") -> str:
    """float64 ``(N, C)`` sums over the spatial axes of a float32 tensor: ``op`` over the last (contiguous) axis in
    float32, then a float64 ``ReduceSum`` over the other spatial axes."""
    last = b.reduce(x, op, source, [rank - 1], f"{base}_row")
    wide = b.node(x, "Cast", [last], f"{base}_f64", to=onnx.TensorProto.DOUBLE)
    return b.reduce(x, "ReduceSum", wide, list(range(2, rank - 1)), base) if rank > 3 else wide


def _pool_one(b: _Builder, x: str, shape: tuple[int | None, ...], elem_type: int, bins: int,
              summaries: bool, source: str | None = None) -> PooledProbe:
    """The pooled outputs of probe ``x`` read from ``source`` (default ``x``; a channels-first view of it)."""
    double, rank, src = onnx.TensorProto.DOUBLE, len(shape), source or x
    shape_out = b.output(b.node(x, "Shape", [src], f"{x}__probe_shape"), onnx.TensorProto.INT64)
    xf = src if elem_type == onnx.TensorProto.FLOAT else b.node(x, "Cast", [src], f"{x}__probe_f32",
                                                                 to=onnx.TensorProto.FLOAT)
    sizes = None
    if rank == 2:
        sums = b.node(x, "Cast", [xf], f"{x}__probe_sum", to=double)
    elif bins == 1:
        sums = _spatial_sum(b, x, xf, rank, f"{x}__probe_sum")
    else:
        h, w = shape[2:]
        rows, cols = adaptive_bins(h, bins), adaptive_bins(w, bins)  # type: ignore[arg-type]
        left = np.zeros((bins, h), np.float64)  # type: ignore[arg-type]
        right = np.zeros((w, bins), np.float32)  # type: ignore[arg-type]
        for i, (lo, hi) in enumerate(rows):
            left[i, lo:hi] = 1.0
        for j, (lo, hi) in enumerate(cols):
            right[lo:hi, j] = 1.0
        by_col = b.node(x, "MatMul", [xf, b.const(f"{x}__probe_cols", right)], f"{x}__probe_colsum")
        wide = b.node(x, "Cast", [by_col], f"{x}__probe_colsum_f64", to=double)
        sums = b.node(x, "MatMul", [b.const(f"{x}__probe_rows", left), wide], f"{x}__probe_sum")
        sizes = tuple(int((r1 - r0) * (c1 - c0)) for r0, r1 in rows for c0, c1 in cols)
    nonzero = abs_sum = None
    if summaries:
        ones = b.node(x, "Abs", [b.node(x, "Sign", [xf], f"{x}__probe_sign")], f"{x}__probe_nz")
        if rank == 2:
            nonzero = b.node(x, "Cast", [ones], f"{x}__probe_nonzero", to=double)
            abs_sum = b.node(x, "Cast", [b.node(x, "Abs", [xf], f"{x}__probe_absval")], f"{x}__probe_abs", to=double)
        else:
            nonzero = _spatial_sum(b, x, ones, rank, f"{x}__probe_nonzero")
            abs_sum = _spatial_sum(b, x, xf, rank, f"{x}__probe_abs", op="ReduceL1")
        b.output(nonzero, double)
        b.output(abs_sum, double)
    return PooledProbe(x, shape_out, b.output(sums, double), nonzero, abs_sum, sizes)


def add_pooled_probes(model: onnx.ModelProto, names: Iterable[str], *, bins: int | Mapping[str, int] = 1,
                      summaries: bool = False, last_axis: Iterable[str] = (),
                      keep_outputs: Iterable[str] = (), sizes: Mapping[str, tuple[int, ...]] | None = None
                      ) -> tuple[onnx.ModelProto, tuple[PooledProbe, ...]]:
    """A copy of ``model`` whose outputs are pooled summaries of the named tensors (and nothing else).

    For a probe ``x`` of shape ``(N, C, *spatial)`` the appended nodes compute the sums over the spatial positions
    (``bins == 1``; the global average is ``sums / prod(spatial)``), or for ``bins = K > 1`` the sums over the
    ``K x K`` adaptive bins of a 4-D probe (bin edges of :func:`adaptive_bins`; two ``MatMul`` s with 0/1 bin
    matrices, exact for overlapping bins too); with ``summaries`` also the count of nonzero entries
    (``ReduceSum(|Sign(x)|)``, exact) and ``Σ|x|`` (``ReduceL1``) per sample and channel; and ``Shape(x)``.
    Memory: onnxruntime orders nodes by a depth-first search from the graph's leaves, starting from the leaf with
    the largest node index. The probe nodes are appended in reverse order of their probes and the original outputs
    are dropped, so the search starts from the first probe's reduction and every probe is reduced as soon as it
    exists; otherwise (probe nodes right after their producers, original outputs kept) the whole network ran first
    and every probe stayed alive to the end (measured on ResNet-50 at batch 64: 5.3 GB instead of 2.1 GB, first runs
    2-3x slower).
    Precision: the contiguous last axis (one image row) is summed in float32 by onnxruntime's vectorised kernels,
    the rows in float64 (``Cast`` in between), so a sum carries about float32's relative rounding (~1e-7) where
    casting the whole activation first would cost a float64 copy of every probe (measured: 10x slower). ``(N, C)`` probes are returned in float64 as
    they are. The new nodes are inserted right after each probe's producer, so onnxruntime reduces an activation
    as soon as it exists and memory and transfer scale with channels, not with channels x positions. The original
    nodes and initializers are untouched.

    Args:
        model: the model (not modified); its declared shapes should cover the probes (a canonical model's do).
        names: probe tensors (node outputs or graph inputs of the main graph).
        bins: K of the K x K adaptive bins (1: global sums), for every probe or per probe name (missing: 1).
        summaries: add the nonzero counts and absolute sums.
        last_axis: probes whose channels lie on their last axis (``ChannelGroupIndex.last_axis``): a ``Transpose``
            brings them to ``(N, C, ...)`` first, so they are pooled over every other axis (``bins`` is 1).
        keep_outputs: original outputs to keep (first, in the model's order), e.g. the class scores whose argmax
            labels the samples (``--labels model``).
        sizes: static probe shapes that win over declared dynamic ones (a prepared model's ``index.shapes``).

    Returns:
        The new model (its outputs: the kept original outputs, then the pooled summaries) and, per probe in the
        order given (duplicates once), the names of its outputs.

    Raises:
        UserInputError: a name is not a tensor of the main graph.
        PreconditionError: a probe's rank is unknown or below 2, or ``bins > 1`` on a probe of rank above 2 without
            a static 4-D shape (``(N, C)`` probes have one cell whatever ``bins``).
    """
    wanted = list(dict.fromkeys(names))
    _check_names(wanted, _known_tensors(model.graph))
    shapes = declared_shapes(model)
    if any(name not in shapes for name in wanted):
        shapes = static_shapes(model)
    shapes = {**shapes, **(sizes or {})}
    builder = _Builder(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info,
                                                             *model.graph.output]}
    probes = []
    last = set(last_axis)
    for name in wanted:
        shape = shapes.get(name)
        k = bins if isinstance(bins, int) else int(bins.get(name, 1))
        if shape is None or len(shape) < 2:
            raise PreconditionError(f"probe '{name}' needs a known shape (N, C, ...); it has {shape}")
        if name in last and len(shape) >= 3:  # channels last: pool a channels-first view
            perm = [0, len(shape) - 1, *range(1, len(shape) - 1)]
            first = builder.node(name, "Transpose", [name], f"{name}__probe_channels_first", perm=perm)
            shape = tuple(shape[i] for i in perm)
            probes.append(_pool_one(builder, name, shape, types.get(name, onnx.TensorProto.FLOAT), 1, summaries,
                                    first))
            continue
        if k > 1 and len(shape) != 2 and (len(shape) != 4 or shape[2] is None or shape[3] is None):
            raise PreconditionError(f"{k}x{k} pooling needs a static 4-D (N, C, H, W) probe, but '{name}' has "
                                    f"shape {shape}; use global pooling or fix the input shape")
        probes.append(_pool_one(builder, name, shape, types.get(name, onnx.TensorProto.FLOAT), k, summaries))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    order = {name: i for i, node in enumerate(graph.node) for name in node.output}
    for name in sorted(wanted, key=lambda t: order.get(t, -1), reverse=True):  # latest probe first (docstring)
        graph.node.extend(builder.nodes[name])
    graph.initializer.extend(builder.inits)
    kept = [vi for vi in graph.output if vi.name in set(keep_outputs)]
    del graph.output[:]
    graph.output.extend(kept)
    graph.output.extend(builder.outputs)
    return out, tuple(probes)


@dataclass(frozen=True)
class PositionGather:
    """Gather ``tensor`` ``(N, C, H, W)`` (restricted to the channels ``keep`` when given) at per-sample flat
    positions: the graph reads int32 indices ``(N, 1, M)`` into the ``H * W`` positions from input ``index`` and,
    when ``mask`` names an input, a float32 ``(N, 1, M)`` mask that zeroes the gathered values (taps that fall into
    a convolution's zero padding point at any position and are masked); it returns ``(N, C, M)`` as output
    ``output``. ``channels`` is the ``C`` returned (static)."""

    tensor: str
    index: str
    output: str
    channels: int
    mask: str | None = None
    keep: tuple[int, ...] | None = None  # gather only these channels (then ``channels`` is their count)


def add_position_gathers(model: onnx.ModelProto, gathers: Iterable[PositionGather]) -> onnx.ModelProto:
    """A copy of ``model`` with, per :class:`PositionGather`, an index input and a gathered output appended.

    Nodes: ``Gather`` of the kept channels (when ``keep``) -> ``Reshape`` to ``(N, C, H W)`` -> ``GatherElements``
    along axis 2 with the indices broadcast over channels (``Expand`` to ``(N, C, M)``) -> ``Mul`` by the mask (when
    given). So recovery receives the few sampled positions of a layer's input or output, not the whole activation,
    and no padded copy of it is made. Exact (a gather; masked taps are exact zeros). The chains are appended in reverse order of their tensors'
    producers, so onnxruntime's depth-first ordering runs each as soon as its tensor exists (see
    :func:`add_pooled_probes`). Needs opset >= 11 (``GatherElements``).

    Raises:
        PreconditionError: opset below 11.
    """
    gathers = list(gathers)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not gathers:
        return out
    version = opset(model)
    if version < 11:
        raise PreconditionError(f"gathering sampled positions needs opset >= 11 (GatherElements); the model has "
                                f"opset {version}")
    graph = out.graph
    builder = _Builder(out)
    builder.taken.update(name for spec in gathers for name in (spec.index, spec.output, spec.mask) if name)
    for spec in gathers:
        source = spec.tensor
        if spec.keep is not None:
            source = builder.node(spec.tensor, "Gather", [source, builder.const(
                f"{spec.output}_keep", np.asarray(spec.keep, np.int64))], f"{spec.output}_kept", axis=1)
        flat = builder.node(spec.tensor, "Reshape", [source, builder.const(f"{spec.output}_shape",
                                                                           np.asarray([0, 0, -1], np.int64))],
                            f"{spec.output}_flat")
        wide = builder.node(spec.tensor, "Expand", [spec.index, builder.const(
            f"{spec.output}_channels", np.asarray([1, spec.channels, 1], np.int64))], f"{spec.output}_index")
        gathered = spec.output if spec.mask is None else builder.name(f"{spec.output}_unmasked")
        node = onnx.helper.make_node("GatherElements", [flat, wide], [gathered], name=gathered, axis=2)
        builder.nodes.setdefault(spec.tensor, []).append(node)
        graph.input.append(onnx.helper.make_tensor_value_info(spec.index, onnx.TensorProto.INT32, [None, 1, None]))
        if spec.mask is not None:
            builder.nodes[spec.tensor].append(onnx.helper.make_node("Mul", [gathered, spec.mask], [spec.output],
                                                                    name=spec.output))
            graph.input.append(onnx.helper.make_tensor_value_info(spec.mask, onnx.TensorProto.FLOAT, [None, 1, None]))
        builder.outputs.append(onnx.helper.make_tensor_value_info(spec.output, onnx.TensorProto.FLOAT, None))
    order = {name: i for i, node in enumerate(graph.node) for name in node.output}
    for spec in sorted(gathers, key=lambda g: order.get(g.tensor, -1), reverse=True):
        graph.node.extend(builder.nodes.pop(spec.tensor, ()))
    graph.initializer.extend(builder.inits)
    graph.output.extend(builder.outputs)
    return out


@dataclass(frozen=True)
class LocationView:
    """The outputs that :func:`add_location_views` adds for one probe tensor.

    Attributes:
        tensor: the probe.
        kind: ``grid`` (the channels-first probe ``(N, C, h, w)``), ``line`` (``(N, C, L)``: a 3-D probe, or a 4-D
            one averaged over its height) or ``pooled`` (``(N, C)``: averaged over every position).
        output: the view (``gather`` None), or the view gathered at fed positions, float32 ``(N, C, M)``.
        shape: ``Shape`` of the view (int64), so that its grid is known at run time.
        gather: the int32 input ``(N, 1, M)`` of flat positions into the view's grid (``grid``/``line`` views of a
            gathering model), else None.
        channels: ``C`` (None when not static).
    """

    tensor: str
    kind: str
    output: str
    shape: str
    gather: str | None = None
    channels: int | None = None


def add_location_views(model: onnx.ModelProto, views: Iterable[tuple[str, str]], *,
                       gather: bool | Collection[str] = False, last_axis: Iterable[str] = (),
                       keep_outputs: Iterable[str] = (),
                       summaries: bool = False) -> tuple[onnx.ModelProto, tuple[LocationView, ...],
                                                         tuple[PooledProbe, ...]]:
    """A copy of ``model`` whose outputs are per-location views of the named probes (what location-aware
    calibration reads), the kept original outputs, and (``summaries``) the pooled summaries of
    :func:`add_pooled_probes`.

    Per ``(tensor, kind)``: a probe whose channels lie on its last axis is brought to ``(N, C, ...)`` by a
    ``Transpose`` first (as in :func:`add_pooled_probes`), a non-float32 one is cast to float32; then ``grid`` keeps
    the ``(N, C, h, w)`` probe, ``line`` averages a 4-D probe over its height (``ReduceMean`` axis 2) and keeps a
    3-D one, ``pooled`` averages over every position (``ReduceMean`` over the axes after the channels). With
    ``gather`` (True: every view; or the probes to gather), ``grid`` and ``line`` views are reshaped to
    ``(N, C, P)`` and gathered at the fed positions
    (``GatherElements`` along axis 2, the ``(N, 1, M)`` indices expanded over the channels): onnxruntime returns
    ``(N, C, M)``, not the activation. The chains are appended in reverse order of their probes' producers and the
    other original outputs are dropped, so every view is computed as soon as its probe exists (see
    :func:`add_pooled_probes`). Exact: transposes, float32 means and gathers of the probe's values.

    Raises:
        UserInputError: a name is not a tensor of the main graph.
        PreconditionError: a probe's rank is unknown or below 2, an unknown kind, gathers below opset 11, a
            ``line`` view of rank other than 3 or 4, a ``grid`` view of rank other than 4.
    """
    wanted = [(name, kind) for name, kind in dict.fromkeys((n, k) for n, k in views)]
    _check_names([name for name, _ in wanted], _known_tensors(model.graph))
    keep = list(dict.fromkeys(keep_outputs))
    if gather and opset(model) < 11:
        raise PreconditionError(f"gathering locations needs opset >= 11 (GatherElements); the model has opset "
                                f"{opset(model)}")
    shapes = declared_shapes(model)
    if any(name not in shapes for name, _ in wanted):
        shapes = static_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info,
                                                             *model.graph.output]}
    b = _Builder(model)
    out_views, pooled = [], []
    last = set(last_axis)
    for name, kind in wanted:
        shape = shapes.get(name)
        if shape is None or len(shape) < 2:
            raise PreconditionError(f"probe '{name}' needs a known shape (N, C, ...); it has {shape}")
        source, perm = name, None
        if name in last and len(shape) >= 3:
            perm = [0, len(shape) - 1, *range(1, len(shape) - 1)]
            source = b.node(name, "Transpose", [name], f"{name}__loc_channels_first", perm=perm)
            shape = tuple(shape[i] for i in perm)
        if types.get(name, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            source = b.node(name, "Cast", [source], f"{name}__loc_f32", to=onnx.TensorProto.FLOAT)
        out_views.append(_view_one(b, name, kind, source, shape, gather if isinstance(gather, bool) else
                                   name in set(gather)))
        if summaries:
            pooled.append(_pool_one(b, name, shape, onnx.TensorProto.FLOAT, 1, True, source))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    order = {name: i for i, node in enumerate(graph.node) for name in node.output}
    for name in sorted({n for n, _ in wanted}, key=lambda t: order.get(t, -1), reverse=True):
        graph.node.extend(b.nodes[name])
    graph.initializer.extend(b.inits)
    kept = [vi for vi in graph.output if vi.name in keep]
    missing = set(keep) - {vi.name for vi in kept}
    if missing:
        raise UserInputError(f"cannot keep output(s) {sorted(missing)}: not outputs of the model")
    del graph.output[:]
    graph.output.extend(kept)
    graph.output.extend(b.outputs)
    for view in out_views:
        if view.gather is not None:
            graph.input.append(onnx.helper.make_tensor_value_info(view.gather, onnx.TensorProto.INT32,
                                                                  [None, 1, None]))
    return out, tuple(out_views), tuple(pooled)


def _view_one(b: _Builder, name: str, kind: str, source: str, shape: tuple[int | None, ...],
              gather: bool) -> LocationView:
    """The view nodes of one probe (see :func:`add_location_views`)."""
    rank = len(shape)
    if kind == "pooled":
        view = source if rank == 2 else b.reduce(name, "ReduceMean", source, list(range(2, rank)),
                                                 f"{name}__loc_pooled")
    elif kind == "line" and rank in (3, 4):
        view = source if rank == 3 else b.reduce(name, "ReduceMean", source, [2], f"{name}__loc_line")
    elif kind == "grid" and rank == 4:
        view = source
    else:
        raise PreconditionError(f"probe '{name}' of rank {rank} has no '{kind}' view (grid: rank 4; line: rank 3 "
                                f"or 4; pooled: any)")
    shape_out = b.output(b.node(name, "Shape", [view], f"{name}__loc_shape"), onnx.TensorProto.INT64)
    channels = shape[1] if isinstance(shape[1], int) else None
    if not gather or kind == "pooled":
        if view == name:  # a graph output needs its own name: an Identity of the probe
            view = b.node(name, "Identity", [view], f"{name}__loc_view")
        return LocationView(name, kind, b.output(view, onnx.TensorProto.FLOAT), shape_out, None, channels)
    if channels is None:
        raise PreconditionError(f"gathering locations of probe '{name}' needs its static channel count")
    index = b.name(f"{name}__loc_index")
    flat = b.node(name, "Reshape", [view, b.const(f"{name}__loc_flat_shape", np.asarray([0, 0, -1], np.int64))],
                  f"{name}__loc_flat")
    wide = b.node(name, "Expand", [index, b.const(f"{name}__loc_channels", np.asarray([1, channels, 1], np.int64))],
                  f"{name}__loc_index_wide")
    gathered = b.node(name, "GatherElements", [flat, wide], f"{name}__loc_gathered", axis=2)
    return LocationView(name, kind, b.output(gathered, onnx.TensorProto.FLOAT), shape_out, index, channels)
