"""The working state of one channel analysis (union-find over channel spaces, layouts, edits, costs) and the
small readers the per-op rules share. The rules (:mod:`graph_ops.channel_rules`,
:mod:`graph_ops.channel_layout_rules`) read and extend an :class:`Analysis`; :func:`graph_ops.channels.analyze`
runs them and turns the state into the public :class:`~graph_ops.groups.ChannelGroupIndex`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.groups import ChannelGroup, ChannelGroupIndex, CostTerm, Edit, Segment
from graph_ops.proto import Shape, attr, constants, node_name, opset

__all__ = ["Analysis", "Edit", "attr", "describe", "int_list", "node_name", "static_prod"]

Seg = tuple[int, int, int, int]  # (space, offset, start, length) while analysing


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


class Analysis:
    """Working state of one analysis run (union-find over channel spaces, layouts, edits, costs)."""

    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> None:
        """Index the model: its static shapes (given), constants, use counts."""
        self.shapes = dict(shapes)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.constants = constants(model)
        self.shapes.update((name, tuple(t.dims)) for name, t in self.constants.items())
        self.graph = model.graph
        self.uses: dict[str, int] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
                self.readers.setdefault(name, []).append(node)
        self.outputs = {info.name for info in self.graph.output}
        self.opset = opset(model)
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
    def finish(self, fingerprint: str) -> ChannelGroupIndex:
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
        return ChannelGroupIndex(groups, by_tensor, tuple(self._resolve(c, by_tensor) for c in self.costs),
                                 edits=tuple(self.edits), flattened=dict(self.flat), shapes=self.shapes,
                                 fingerprint=fingerprint)

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
