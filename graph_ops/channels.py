"""Channel-group analysis: which channels of which tensors must be removed together (style.md 1.5).

Every activation tensor with a channel axis (axis 1 of NCHW / NC) is described as a run of segments, each a contiguous
slice of one *channel space*. Sources (Conv with ``group=1``, ConvTranspose, Gemm / MatMul with a constant weight)
create a new space; channel-wise ops pass their input's space on; an elementwise op of two activations unions the
spaces (union-find); Concat on axis 1 lays its inputs' segments end to end. The per-op rules are the plain dict
``graph_ops.channel_rules.CHANNEL_RULES``. Anything the rules do not understand *freezes* every space it touches, with a
readable reason (fail closed): a frozen group is never pruned.

Removing channel ``c`` of a group is exact when every tensor that carries the group loses that channel and every
weight that reads it (the *consumer* slots: Conv ``W[:, c]``, Gemm K rows, ``H*W`` blocks after Flatten) loses the
matching slice: the removed channel then reaches no output, which is what the mask oracle
(:mod:`graph_ops.mask`) checks numerically.

Besides the public :class:`~graph_ops.groups.ChannelGroupIndex`, analysis records the list of :class:`Edit` s that a
plan implies (which initializer, along which axis, driven by which tensor's kept channels); :mod:`graph_ops.prune`
and :mod:`graph_ops.mask` apply them.

Preconditions: a topologically sorted graph (ONNX requires it). A canonical model (graph_ops.canonicalize) gives
the most prunable groups; on other models, weights that are not initializers, or exit weights shared between nodes,
freeze the groups concerned. A Conv/Gemm without bias is fine (nothing to slice); a shared bias or BN parameter is
fine too (surgery gives each reader its own sliced copy).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.groups import ChannelGroup, ChannelGroupIndex, CostTerm, Segment

log = logging.getLogger(__name__)

Seg = tuple[int, int, int, int]  # (space, offset, start, length) while analysing


@dataclass(frozen=True)
class Edit:
    """One change a plan implies, driven by the kept channels of ``tensor`` (expanded by ``block``).

    Attributes:
        kind: ``"take"`` (slice input ``pos`` of node ``node`` along ``axis``), ``"group"`` (depthwise ``group``
            attribute), ``"split"`` (Split sizes), ``"slice"`` (Slice starts/ends on axis 1), ``"vector"`` (entry
            ``axis`` of the integer vector at input ``pos``: Reshape shape, Resize sizes).
        node: index of the node in ``graph.node``.
        tensor: the tensor whose channel layout gives the kept indices.
        role: ``"consumer"`` for exit weights that read the channels (what the mask zeroes), else ``"producer"``.
        pos: input position of the constant edited.
        axis: axis of the constant (or entry index for ``"vector"``).
        block: each channel stands for ``block`` consecutive entries (Flatten -> Gemm: ``H*W``).
    """

    kind: str
    node: int
    tensor: str
    role: str = "producer"
    pos: int = 0
    axis: int = 0
    block: int = 1


@dataclass(frozen=True)
class _RawCost:
    node: str
    op_type: str
    macs_coeff: float
    params_coeff: float
    in_fixed: int
    in_tensor: str | None
    out_fixed: int
    out_tensor: str | None
    bias_params: float = 0.0


def infer_shapes_light(model: onnx.ModelProto, small: int = 4096) -> onnx.ModelProto:
    """Shape inference on a copy without large weights (they become typed graph inputs); stale value_info dropped.

    Initializers with at most ``small`` elements stay (Reshape shapes, Split sizes, scales feed data propagation).
    """
    graph = model.graph
    declared = {info.name for info in graph.input}
    inits = [t for t in graph.initializer if math.prod(t.dims) <= small]
    typed = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if math.prod(t.dims) > small and t.name not in declared]
    light_graph = onnx.helper.make_graph(list(graph.node), graph.name, [*graph.input, *typed], list(graph.output),
                                         inits)
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    return onnx.shape_inference.infer_shapes(light, data_prop=True)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shape of every tensor that inference reaches (None for symbolic dims), initializers included."""
    try:
        inferred = infer_shapes_light(model).graph
    except Exception as err:  # shape inference may fail on exotic graphs: analyse without shapes
        log.warning("shape inference failed (%s); groups touching unknown shapes are frozen", err)
        inferred = model.graph
    shapes: dict[str, tuple[int | None, ...]] = {}
    for info in [*inferred.input, *inferred.value_info, *inferred.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    shapes.update((t.name, tuple(t.dims)) for t in model.graph.initializer)
    return shapes


def node_name(node: onnx.NodeProto, idx: int) -> str:
    """The node's name, or ``<op_type>_<idx>`` for unnamed nodes."""
    return node.name or f"{node.op_type}_{idx}"


class Analysis:
    """Working state of one analysis run (union-find over channel spaces, layouts, edits, costs)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        """Index the model: shapes (fresh inference), constants, use counts."""
        self.shapes = _static_shapes(model)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.constants = dict(self.inits)
        self.graph = model.graph
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
                self.shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
        self.uses: dict[str, int] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
                self.readers.setdefault(name, []).append(node)
        self.outputs = {info.name for info in self.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.flat: dict[str, tuple[str, int]] = {}  # Flatten output -> (4-D input, H*W)
        self.layout: dict[str, list[Seg]] = {}
        self.parent: list[int] = []
        self.size: list[int] = []
        self.origin: list[str] = []
        self.reason: list[str | None] = []
        self.producers: list[list[str]] = []
        self.exits: list[tuple[str, str]] = []  # (consumer node name, probe tensor)
        self.edits: list[Edit] = []
        self.costs: list[_RawCost] = []

    # ---- union-find -------------------------------------------------------------------------------------------
    def find(self, space: int) -> int:
        """Root of a space (path halving)."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        """Merge two spaces; the older root stays root (keeps ids topological) and the first reason wins."""
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra != rb:
            self.parent[rb] = ra
            self.reason[ra] = self.reason[ra] or self.reason[rb]
            self.producers[ra].extend(self.producers[rb])

    def new_space(self, tensor: str, size: int, producer: str | None, frozen: str | None = None) -> int:
        """Create a space of ``size`` channels as the whole layout of ``tensor``."""
        space = len(self.parent)
        self.parent.append(space)
        self.size.append(size)
        self.origin.append(tensor)
        self.reason.append(frozen)
        self.producers.append([producer] if producer else [])
        self.layout[tensor] = [(space, 0, 0, size)]
        return space

    # ---- helpers used by the rules ----------------------------------------------------------------------------
    def lay(self, tensor: str) -> list[Seg] | None:
        """The layout of a tensor, or None when it carries no tracked channel space."""
        return self.layout.get(tensor) if tensor else None

    def freeze(self, tensor: str, reason: str) -> None:
        """Freeze every space in the layout of ``tensor`` (the first reason of a space is kept)."""
        if tensor in self.flat:  # a flattened head input: freeze the 4-D tensor it comes from
            self.freeze(self.flat[tensor][0], reason)
        for space, *_ in self.layout.get(tensor, ()):
            root = self.find(space)
            self.reason[root] = self.reason[root] or reason

    def freeze_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        """Freeze the spaces of every input of a node."""
        for name in node.input:
            self.freeze(name, reason)

    def channels(self, tensor: str) -> int:
        """Number of channels of a tensor with a layout."""
        return sum(seg[3] for seg in self.layout[tensor])

    def rank(self, tensor: str) -> int | None:
        """Rank of a tensor if known."""
        shape = self.shapes.get(tensor)
        return None if shape is None else len(shape)

    def const(self, name: str) -> np.ndarray | None:
        """Value of a constant (initializer or Constant node output), else None."""
        proto = self.constants.get(name) if name else None
        return None if proto is None else numpy_helper.to_array(proto)

    def is_const(self, name: str) -> bool:
        """True for initializers and Constant node outputs."""
        return name in self.constants

    def full(self, seg: Seg) -> bool:
        """True when a segment covers its whole space."""
        return seg[2] == 0 and seg[3] == self.size[self.find(seg[0])]

    def union_layouts(self, a: str, b: str, where: str) -> bool:
        """Union two layouts segment by segment; on misalignment freeze both and return False."""
        la, lb = self.layout[a], self.layout[b]
        aligned = len(la) == len(lb) and all(
            sa[1] == sb[1] and sa[3] == sb[3] and self.full(sa) and self.full(sb) for sa, sb in zip(la, lb, strict=False)
        )
        if not aligned:
            self.freeze(a, f"misaligned channel layouts at {where}")
            self.freeze(b, f"misaligned channel layouts at {where}")
            return False
        for sa, sb in zip(la, lb, strict=True):
            self.union(sa[0], sb[0])
        return True

    def slot(self, node: onnx.NodeProto, idx: int, pos: int, tensor: str, axis: int, **kw: object) -> bool:
        """Record a ``take`` edit of input ``pos``; freeze ``tensor`` when the constant cannot be edited.

        Surgery writes a new initializer per (node, input), so a shared producer-side constant is fine; an exit
        weight shared with another node freezes (the mask oracle edits it by name).
        """
        name = node.input[pos] if pos < len(node.input) else ""
        if not name:
            return True
        where = f"{node.op_type} '{node_name(node, idx)}'"
        if name not in self.inits:
            self.freeze(tensor, f"input {pos} of {where} is not an initializer")
            return False
        if self.uses.get(name, 0) > 1 and kw.get("role") == "consumer":  # the mask zeroes weights by name
            self.freeze(tensor, f"exit weight '{name}' of {where} is shared by several nodes")
            return False
        self.edits.append(Edit("take", idx, tensor, pos=pos, axis=axis, **kw))  # type: ignore[arg-type]
        return True

    def add_cost(self, *args: object, **kw: object) -> None:
        """Record a cost term whose widths come from tensors' layouts (resolved at the end)."""
        self.costs.append(_RawCost(*args, **kw))  # type: ignore[arg-type]

    def run(self, rules: dict) -> None:
        """Apply the rules to every node in topological order, then freeze what reaches graph outputs."""
        for info in self.graph.input:
            shape = self.shapes.get(info.name)
            if info.name not in self.inits and shape and len(shape) >= 2 and shape[1]:
                self.new_space(info.name, shape[1], None, frozen=f"produced by graph input '{info.name}'")
        for idx, node in enumerate(self.graph.node):
            for name in sorted(_subgraph_reads(node)):  # outer tensors read implicitly by If / Loop bodies
                self.freeze(name, f"read inside a subgraph of {node.op_type} '{node_name(node, idx)}'")
            rule = rules.get(node.op_type)
            if rule is not None:
                rule(self, node, idx)
            elif any(self.lay(name) for name in node.input):
                self.freeze_inputs(node, f"unsupported consumer {node.op_type} at node '{node_name(node, idx)}'")
        for info in self.graph.output:
            self.freeze(info.name, f"reaches graph output '{info.name}'")

    # ---- results ----------------------------------------------------------------------------------------------
    def finish(self) -> ChannelGroupIndex:
        """Resolve the union-find into the public index (ids topological, deterministic)."""
        roots = sorted({self.find(s) for s in range(len(self.parent))})
        gid = {r: self.origin[r] for r in roots}
        by_tensor = {
            t: tuple(Segment(gid[self.find(s)], off, start, n) for s, off, start, n in segs)
            for t, segs in self.layout.items()
        }
        consumers: dict[str, list[str]] = {g: [] for g in gid.values()}
        probes: dict[str, list[str]] = {g: [] for g in gid.values()}
        for node, probe in self.exits:
            for seg in by_tensor.get(probe, ()):
                _append_new(consumers[seg.group_id], node)
                _append_new(probes[seg.group_id], probe)
        groups = tuple(
            ChannelGroup(gid[r], self.size[r], tuple(dict.fromkeys(self.producers[r])),
                         tuple(consumers[gid[r]]), tuple(probes[gid[r]]), self.reason[r])
            for r in roots
        )
        return ChannelGroupIndex(groups, by_tensor, tuple(self._resolve(c, by_tensor) for c in self.costs))

    @staticmethod
    def _resolve(raw: _RawCost, by_tensor: dict[str, tuple[Segment, ...]]) -> CostTerm:
        in_groups = tuple(s.group_id for s in by_tensor[raw.in_tensor]) if raw.in_tensor else ()
        out_groups = tuple(s.group_id for s in by_tensor[raw.out_tensor]) if raw.out_tensor else ()
        return CostTerm(raw.node, raw.op_type, raw.macs_coeff, raw.params_coeff, raw.in_fixed, in_groups,
                        raw.out_fixed, out_groups, raw.bias_params)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names read by the nodes of a node's subgraphs (recursively)."""
    names: set[str] = set()
    for att in node.attribute:
        for graph in [att.g] if att.type == onnx.AttributeProto.GRAPH else list(att.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def _append_new(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def analyze_with_edits(model: onnx.ModelProto) -> tuple[ChannelGroupIndex, tuple[Edit, ...]]:
    """Analyse a model and also return the edits a plan implies (used by prune and mask)."""
    from graph_ops.channel_rules import CHANNEL_RULES  # channel_rules imports this module's types

    state = Analysis(model)
    state.run(CHANNEL_RULES)
    index = state.finish()
    frozen = sum(1 for g in index.groups if g.frozen)
    log.debug("analysis: %d groups (%d frozen), %d edits", len(index.groups), frozen, len(state.edits))
    return index, tuple(state.edits)


def analyze(model: onnx.ModelProto) -> ChannelGroupIndex:
    """Find the channel groups of a model (see the module docstring).

    Args:
        model: an ONNX model, ideally canonical (graph_ops.canonicalize); it is not modified.

    Returns:
        The groups in topological order, each tensor's channel layout and the bilinear cost model.
    """
    return analyze_with_edits(model)[0]


def producer_weights(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Producer node name -> (weight initializer name, output-channel axis), read off the surgery's own edits.

    This is what the data-free scorers (``l1``, ``l2``) need: the rows of each producer's weight that make a channel.
    """
    index, edits = analyze_with_edits(model)
    producers = {name for group in index.groups for name in group.producers}
    weights: dict[str, tuple[str, int]] = {}
    for edit in edits:
        node = model.graph.node[edit.node]
        name = node_name(node, edit.node)
        if edit.kind == "take" and edit.role == "producer" and edit.pos == 1 and name in producers:
            weights.setdefault(name, (node.input[1], edit.axis))
    return weights


def prunable_share(model: onnx.ModelProto, index: ChannelGroupIndex) -> float:
    """Share of Conv output channels (summed over every Conv node) that belong to prunable groups.

    A residual group produced by four convs counts four times, as the channels each conv produces.
    Returns 0.0 for a model without Conv.
    """
    groups = index.by_id
    prunable = total = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.output[0] not in index.by_tensor:
            continue
        for seg in index.by_tensor[node.output[0]]:
            total += seg.length
            prunable += seg.length if groups[seg.group_id].prunable else 0
    return prunable / total if total else 0.0


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Value of a node attribute, or ``default``."""
    for att in node.attribute:
        if att.name == name:
            return onnx.helper.get_attribute_value(att)
    return default


def int_list(a: Analysis, node: onnx.NodeProto, pos: int, attr_name: str) -> list[int] | None:
    """Integer list given as attribute ``attr_name`` or as constant input ``pos`` (None when absent or dynamic)."""
    value = attr(node, attr_name)
    if value is not None:
        return [int(v) for v in value]  # type: ignore[union-attr]
    if pos < len(node.input) and node.input[pos]:
        arr = a.const(node.input[pos])
        return None if arr is None else [int(v) for v in arr.ravel()]
    return None


def describe(node: onnx.NodeProto, idx: int) -> str:
    """``<op_type> '<name>'`` for messages."""
    return f"{node.op_type} '{node_name(node, idx)}'"


def static_prod(dims: tuple[int | None, ...]) -> int | None:
    """Product of dims, None if one is unknown."""
    return None if any(d is None for d in dims) else math.prod(dims)  # type: ignore[arg-type]
