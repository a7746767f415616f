"""The working state of one channel analysis (refinable channel spaces, layouts, edits, costs, grouped-conv block
constraints, integer shape vectors) and the small readers the per-op rules share. The rules
(:mod:`graph_ops.channel_rules`, :mod:`graph_ops.channel_layout_rules`, :mod:`graph_ops.channel_shape_rules`) read
and extend an :class:`Analysis`; :func:`graph_ops.channels.analyze` runs them and :meth:`Analysis.finish` turns
the state into the public :class:`~graph_ops.groups.ChannelGroupIndex`: every segment is refined to whole pieces
(:mod:`graph_ops.channel_spaces`), each piece (a union-find root that is not cut) becomes a group, and segments,
cost terms and probes are resolved to those groups.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.channel_spaces import Spaces, merge_blocks
from graph_ops.groups import ChannelGroup, ChannelGroupIndex, CostTerm, Edit, Segment
from graph_ops.proto import Shape, attr, batch_leading_dims, constants, node_name, opset

__all__ = ["Analysis", "Edit", "attr", "describe", "int_list", "node_name", "static_prod"]

Seg = tuple[int, int, int, int]  # (space, offset, start, length) while analysing
Dim = tuple[str, int] | int | None  # an entry of an integer shape vector: (tensor, axis), a constant, unknown


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
    divisor: int = 1
    macs_known: bool = True


class Analysis:
    """Working state of one analysis run: refinable channel spaces (:mod:`graph_ops.channel_spaces`), each tensor's
    layout as segments of them, edits, costs, equal-block constraints of grouped convolutions."""

    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> None:
        """Index the model: its static shapes (given), constants, use counts."""
        self.shapes = dict(shapes)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.constants = constants(model)
        self.shapes.update((name, tuple(t.dims)) for name, t in self.constants.items())
        self.graph = model.graph
        self.uses: dict[str, int] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.producer = {out: i for i, node in enumerate(self.graph.node) for out in node.output}
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
                self.readers.setdefault(name, []).append(node)
        self.outputs = {info.name for info in self.graph.output}
        self.opset = opset(model)
        self.flat: dict[str, tuple[str, int]] = {}  # Flatten output -> (4-D input, H*W)
        self.layout: dict[str, list[Seg]] = {}
        self.spaces = Spaces()
        self.blocks: list[tuple[str, int, str]] = []  # (tensor, conv groups, where): equal kept count per block
        self.exits: list[tuple[str, str]] = []  # (consumer node name, probe tensor)
        self.edits: list[Edit] = []
        self.costs: list[_RawCost] = []
        self.dims: dict[str, list[Dim]] = {}  # small integer tensors' entries, row-major (channel_shape_rules)
        self.dim_shapes: dict[str, tuple[int, ...]] = {}  # their shapes, where the rules know them
        self.last_axis: set[str] = set()  # tensors whose channels lie on the last axis (a Linear's token features)
        self.branched: dict[str, int] = {}  # tensors whose channels lie on this axis (>= 2; stacked branches, NHWC)
        inits = {t.name for t in model.graph.initializer}
        self.batch_static = all(  # every graph input declares a static batch (a constant batch entry is safe)
            info.type.tensor_type.shape.dim and info.type.tensor_type.shape.dim[0].dim_value > 0
            for info in model.graph.input if info.name not in inits)
        self.model = model
        self._leading: tuple[dict[str, int | None], int | None] | None = None  # batch_leading_dims, when asked

    def new_space(self, tensor: str, size: int, producer: str | None, frozen: str | None = None) -> int:
        """Create a space of ``size`` channels as the whole layout of ``tensor``."""
        space = self.spaces.new(tensor, size, producer, frozen)
        self.layout[tensor] = [(space, 0, 0, size)]
        return space

    # ---- helpers used by the rules ----------------------------------------------------------------------------
    def lay(self, tensor: str) -> list[Seg] | None:
        """The layout of a tensor, or None when it carries no tracked channel space."""
        return self.layout.get(tensor) if tensor else None

    def freeze(self, tensor: str, reason: str) -> None:
        """Freeze the channels ``tensor`` carries (the pieces of its segments; the first reason of a piece is kept)."""
        if tensor in self.flat:  # a flattened head input: freeze the 4-D tensor it comes from
            self.freeze(self.flat[tensor][0], reason)
        for space, _, start, length in self.layout.get(tensor, ()):
            self.spaces.freeze(space, start, length, reason)

    def freeze_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        """Freeze the spaces of every input of a node."""
        for name in node.input:
            self.freeze(name, reason)

    def batch_major(self, tensor: str) -> bool:
        """True when the tensor's axis 0 is the graph input's batch axis (shape inference with the batch fixed,
        :func:`graph_ops.proto.batch_leading_dims`, run once when first asked), so that its other axes belong to
        one sample each (not, e.g., image patches folded into the batch axis)."""
        if self._leading is None:
            self._leading = batch_leading_dims(self.model)
        leading, batch = self._leading
        return batch is not None and leading.get(tensor) == batch

    def channel_axis(self, tensor: str) -> int:
        """The axis of a tensor's channels: the last one for :attr:`last_axis` tensors, the recorded one for
        :attr:`branched` ones, else 1."""
        if tensor in self.branched:
            return self.branched[tensor]
        rank = self.rank(tensor)
        return rank - 1 if tensor in self.last_axis and rank else 1

    def mark_like(self, source: str, out: str) -> None:
        """Give ``out`` the channel axis of ``source`` (last axis, another recorded axis, or axis 1)."""
        if source in self.last_axis:
            self.last_axis.add(out)
        if source in self.branched:
            self.branched[out] = self.branched[source]

    def set_axis(self, tensor: str, axis: int) -> None:
        """Record that ``tensor``'s channels lie on ``axis`` (axis 1 is the default, not recorded)."""
        if axis == 1:
            self.branched.pop(tensor, None)
        else:
            self.branched[tensor] = axis

    def keeps_batch(self, entry: Dim, x: str) -> bool:
        """True when a Reshape target entry 0 is ``x``'s batch for every input size: ``0`` (copied), axis 0 of ``x``
        or of another tensor whose axis 0 is the graph's batch as ``x``'s is (:meth:`batch_major`) read through
        ``Shape``, or its static size when every graph input's batch is static."""
        shape = self.shapes.get(x) or (None,)
        if isinstance(entry, tuple):
            return entry[1] == 0 and (entry[0] == x or (self.batch_major(entry[0]) and self.batch_major(x)))
        return entry == 0 or (self.batch_static and isinstance(entry, int) and entry == shape[0])

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

    def union_layouts(self, a: str, b: str, where: str) -> bool:
        """Join two layouts channel by channel, refining both to their common segmentation (module
        :mod:`graph_ops.channel_spaces`); layouts of different widths freeze both and return False."""
        if self.channels(a) != self.channels(b):
            self.freeze(a, f"misaligned channel layouts at {where}")
            self.freeze(b, f"misaligned channel layouts at {where}")
            return False
        self.union_segments(self.layout[a], self.layout[b])
        return True

    def union_segments(self, la: list[Seg], lb: list[Seg]) -> None:
        """Join two layouts of equal width (segments laid from offset 0) channel by channel."""
        width = sum(seg[3] for seg in la)
        bounds = sorted({off for _, off, _, _ in la} | {off for _, off, _, _ in lb} | {width})
        for lo, hi in itertools.pairwise(bounds):
            (sa, ia), (sb, ib) = _at(la, lo), _at(lb, lo)
            self.spaces.union_range(sa, ia, sb, ib, hi - lo)

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
        kind = str(kw.pop("kind", "take"))
        self.edits.append(Edit(kind, idx, tensor, pos=pos, axis=axis, **kw))  # type: ignore[arg-type]
        return True

    def add_cost(self, *args: object, **kw: object) -> None:
        """Record a cost term whose widths come from tensors' layouts (resolved at the end)."""
        self.costs.append(_RawCost(*args, **kw))  # type: ignore[arg-type]

    def run(self, rules: dict, shapes_hook: Callable[[Analysis, onnx.NodeProto, int], bool] | None = None,
            last_axis_ops: Collection[str] = (), branch_ops: Collection[str] = ()) -> None:
        """Apply the rules to every node in topological order, then freeze what reaches graph outputs.

        ``shapes_hook`` sees every node first and returns True when it handled the node as integer shape
        arithmetic (:func:`graph_ops.channel_shape_rules.track_shapes`). Only ``last_axis_ops`` may read a tensor
        whose channels lie on its last axis, only ``branch_ops`` a :attr:`branched` one; any other op freezes its
        channels.
        """
        for info in self.graph.input:
            shape = self.shapes.get(info.name)
            if info.name not in self.inits and shape and len(shape) >= 2 and shape[1]:
                self.new_space(info.name, shape[1], None, frozen=f"produced by graph input '{info.name}'")
        for idx, node in enumerate(self.graph.node):
            for name in sorted(_subgraph_reads(node)):  # outer tensors read implicitly by If / Loop bodies
                self.freeze(name, f"read inside a subgraph of {node.op_type} '{node_name(node, idx)}'")
            if shapes_hook is not None and shapes_hook(self, node, idx):
                continue
            rule = rules.get(node.op_type)
            if node.op_type not in last_axis_ops and any(self.lay(n) and n in self.last_axis for n in node.input):
                self.freeze_inputs(node, f"channels on the last axis reach {node.op_type} at node "
                                         f"'{node_name(node, idx)}'")
            elif node.op_type not in branch_ops and any(self.lay(n) and n in self.branched for n in node.input):
                axis = next(self.branched[n] for n in node.input if self.lay(n) and n in self.branched)
                self.freeze_inputs(node, f"channels on axis {axis} reach {node.op_type} at node "
                                         f"'{node_name(node, idx)}'")
            elif rule is not None:
                rule(self, node, idx)
            elif any(self.lay(name) for name in node.input):
                self.freeze_inputs(node, f"unsupported consumer {node.op_type} at node '{node_name(node, idx)}'")
        for info in self.graph.output:
            self.freeze(info.name, f"reaches graph output '{info.name}'")
            for entry in self.dims.get(info.name, ()):
                if isinstance(entry, tuple) and entry[1] == 1:
                    self.freeze(entry[0], f"its channel count reaches graph output '{info.name}'")

    # ---- results ----------------------------------------------------------------------------------------------
    def finish(self, fingerprint: str) -> ChannelGroupIndex:
        """Refine every space to whole pieces per segment, resolve the union-find into the public index (ids
        deterministic, groups in topological order of their origin)."""
        sp = self.spaces
        for segs in self.layout.values():
            for space, _, start, length in segs:
                sp.whole_leaves(space, start, length)
        blocks = self._block_counts()
        roots = sorted({sp.find(leaf) for segs in self.layout.values() for space, _, start, length in segs
                        for leaf, _, _ in sp.leaves(space, start, length)}, key=lambda r: sp.key[r])
        gid = {r: sp.group_id(r) for r in roots}
        by_tensor = {t: self._segments(segs, gid) for t, segs in self.layout.items()}
        consumers: dict[str, list[str]] = {g: [] for g in gid.values()}
        probes: dict[str, list[str]] = {g: [] for g in gid.values()}
        for node, probe in self.exits:
            for seg in by_tensor.get(probe, ()):
                _append_new(consumers[seg.group_id], node)
                _append_new(probes[seg.group_id], probe)
        groups = tuple(
            ChannelGroup(gid[r], sp.size[r], tuple(dict.fromkeys(sp.producers[r])), tuple(consumers[gid[r]]),
                         tuple(probes[gid[r]]), sp.reason[r], blocks.get(r, 1))
            for r in roots
        )
        return ChannelGroupIndex(groups, by_tensor, tuple(self._resolve(c, by_tensor) for c in self.costs),
                                 edits=tuple(self.edits), flattened=dict(self.flat), shapes=self.shapes,
                                 fingerprint=fingerprint,
                                 last_axis=frozenset(t for t in self.last_axis if t in by_tensor),
                                 branched={t: ax for t, ax in self.branched.items() if t in by_tensor})

    def _segments(self, segs: list[Seg], gid: dict[int, str]) -> tuple[Segment, ...]:
        out = []
        for space, offset, start, length in segs:
            pos = offset
            for leaf, _, n in self.spaces.leaves(space, start, length):
                out.append(Segment(gid[self.spaces.find(leaf)], pos, 0, n))
                pos += n
        return tuple(out)

    def _block_counts(self) -> dict[int, int]:
        """Equal-count blocks per piece from grouped convolutions; a constraint that spans several pieces, or
        two that do not nest, freezes the pieces concerned (fail closed)."""
        sp, counts = self.spaces, {}
        for tensor, conv_groups, where in self.blocks:
            segs = self.layout.get(tensor, [])
            leaves = [sp.find(leaf) for space, _, start, length in segs
                      for leaf in sp.whole_leaves(space, start, length)]
            if len(leaves) == conv_groups > 1 and len(set(leaves)) == 1:
                continue  # every conv group reads a whole copy of one group (split attention): equal by itself
            if len(leaves) != 1:
                self.freeze(tensor, f"grouped Conv (group={conv_groups}) at {where} reads channels of several "
                                    f"groups")
                continue
            leaf = leaves[0]
            merged = merge_blocks(counts.get(leaf, 1), conv_groups, sp.size[leaf])
            if merged is None or merged == sp.size[leaf]:
                why = "one channel per conv group" if merged else f"blocks of {counts[leaf]} and {conv_groups} do not nest"
                self.freeze(tensor, f"grouped Conv (group={conv_groups}) at {where}: {why}")
                continue
            counts[leaf] = merged
        return {sp.find(leaf): n for leaf, n in counts.items() if sp.reason[sp.find(leaf)] is None}

    @staticmethod
    def _resolve(raw: _RawCost, by_tensor: dict[str, tuple[Segment, ...]]) -> CostTerm:
        in_groups = tuple(s.group_id for s in by_tensor[raw.in_tensor]) if raw.in_tensor else ()
        out_groups = tuple(s.group_id for s in by_tensor[raw.out_tensor]) if raw.out_tensor else ()
        return CostTerm(raw.node, raw.op_type, raw.macs_coeff, raw.params_coeff, raw.in_fixed, in_groups,
                        raw.out_fixed, out_groups, raw.bias_params, raw.divisor, raw.macs_known)


def _at(segs: list[Seg], pos: int) -> tuple[int, int]:
    """(space, channel in space) of tensor channel ``pos`` of a layout."""
    for space, offset, start, length in segs:
        if offset <= pos < offset + length:
            return space, start + pos - offset
    raise AssertionError(f"channel {pos} outside the layout")


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
