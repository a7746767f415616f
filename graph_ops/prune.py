"""Physical channel removal: ``apply_plan(model, index, keep)``.

A plan keeps, for some groups, a subset of their channels (sorted indices). For every tensor ``t`` whose layout
holds segments of those groups, the kept indices along axis 1 are ``offset + (k - start)`` for each kept channel ``k``
of each segment (:func:`kept_indices`). Surgery applies the edits recorded by analysis with those
indices: ``np.take`` of initializers along the recorded axis (producer rows and biases, BN / PRelu / Mul constants,
depthwise weights, consumer input slices, Gemm K rows in blocks of ``H*W``), depthwise ``group = len(keep)``, Split
sizes, Slice starts/ends on axis 1, Reshape / Resize integer vectors. Concat needs nothing (its inputs shrink).

Exactness: every removed channel is removed from every tensor that carries it and from every weight that reads it,
so the pruned model computes exactly what the original computes with those channels' exit weights zeroed
(:func:`graph_ops.mask.zero_channels`), up to floating-point summation order.

Preconditions: ``index`` is ``analyze(model)`` (checked: same group ids and sizes). New initializers are named
``<orig>__pruned`` (never edited in place); the input model is not mutated. The result has fresh shapes and passes
``onnx.checker`` full check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.channels import Edit, analyze_with_edits, infer_shapes_light
from graph_ops.errors import PlanValidationError
from graph_ops.groups import ChannelGroupIndex, Segment
from graph_ops.io import verify_model

log = logging.getLogger(__name__)


def kept_indices(segments: Sequence[Segment], keep: dict[str, np.ndarray], block: int = 1) -> np.ndarray:
    """Indices along axis 1 of a tensor that survive a plan, expanded to ``block`` entries per channel.

    Args:
        segments: the tensor's layout (``index.by_tensor[name]``).
        keep: sorted kept channel indices per group id; groups not present keep everything.
        block: entries per channel (``H*W`` for a flattened tensor).
    """
    parts = []
    for seg in segments:
        chans = keep.get(seg.group_id)
        if chans is None:
            local = np.arange(seg.length)
        else:
            local = chans[(chans >= seg.start) & (chans < seg.start + seg.length)] - seg.start
        parts.append(seg.offset + local)
    idx = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return (idx[:, None] * block + np.arange(block)).ravel()


def check_index(index: ChannelGroupIndex, fresh: ChannelGroupIndex) -> None:
    """Raise PlanValidationError when ``index`` was not computed from this model."""
    if [(g.id, g.size) for g in index.groups] != [(g.id, g.size) for g in fresh.groups]:
        raise PlanValidationError("the channel-group index does not belong to this model (group ids or sizes "
                                  "differ); re-run analysis on the model the plan is applied to")


def _unique_name(base: str, taken: set[str]) -> str:
    name, n = f"{base}__pruned", 1
    while name in taken:
        name, n = f"{base}__pruned{n}", n + 1
    taken.add(name)
    return name


class _Constants:
    """New values for node inputs, written as fresh initializers at the end (originals are never edited)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.constants = dict(self.inits)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        self.pending: dict[tuple[int, int], np.ndarray] = {}

    def get(self, node: int, pos: int) -> np.ndarray:
        """Current value of input ``pos`` of node ``node`` (edited value if already edited)."""
        key = (node, pos)
        if key not in self.pending:
            name = self.model.graph.node[node].input[pos]
            self.pending[key] = numpy_helper.to_array(self.constants[name])
        return self.pending[key]

    def set(self, node: int, pos: int, value: np.ndarray) -> None:
        """Record a new value for input ``pos`` of node ``node``."""
        self.pending[(node, pos)] = value

    def commit(self) -> None:
        """Write each edited input as a new initializer ``<orig>__pruned``; drop originals no node reads any more.

        An initializer read once (weights, by the canonical form) is replaced in its list slot, which avoids
        rebuilding the list of a large model; a shared one gets a new entry and the original stays for its other
        readers.
        """
        graph = self.model.graph
        taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        uses: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        slot = {t.name: i for i, t in enumerate(graph.initializer)}
        for (node_idx, pos), value in sorted(self.pending.items()):
            node = graph.node[node_idx]
            old, new = node.input[pos], _unique_name(node.input[pos], taken)
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), new)
            declared = any(info.name == old for info in graph.input)
            if old in slot and uses.get(old) == 1 and not declared:
                graph.initializer[slot.pop(old)].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
            uses[old] -= 1
            node.input[pos] = new
        graph_io = {info.name for info in [*graph.input, *graph.output]}
        for i in sorted((slot[n] for n in slot if uses.get(n, 0) == 0 and n not in graph_io), reverse=True):
            del graph.initializer[i]


class _Indexer:
    """Kept indices per tensor under a plan (cached)."""

    def __init__(self, index: ChannelGroupIndex, keep: dict[str, np.ndarray]) -> None:
        self.index, self.keep = index, keep
        self.cache: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, tensor: str, block: int) -> np.ndarray:
        key = (tensor, block)
        if key not in self.cache:
            self.cache[key] = kept_indices(self.index.by_tensor[tensor], self.keep, block)
        return self.cache[key]

    def full(self, tensor: str) -> int:
        """Unpruned channel count of a tensor."""
        return sum(seg.length for seg in self.index.by_tensor[tensor])

    def changed(self, tensor: str) -> bool:
        """True when the plan removes channels from this tensor."""
        return any(seg.group_id in self.keep for seg in self.index.by_tensor[tensor])


def _apply_edit(edit: Edit, model: onnx.ModelProto, consts: _Constants, idx_of: _Indexer) -> None:
    node = model.graph.node[edit.node]
    if edit.kind == "take":
        consts.set(edit.node, edit.pos, np.take(consts.get(edit.node, edit.pos), idx_of(edit.tensor, edit.block),
                                                axis=edit.axis))
    elif edit.kind == "group":
        for att in node.attribute:
            if att.name == "group":
                att.i = len(idx_of(edit.tensor, 1))
    elif edit.kind == "vector":
        vec = consts.get(edit.node, edit.pos).copy()
        vec[edit.axis] = len(idx_of(edit.tensor, edit.block))
        consts.set(edit.node, edit.pos, vec)
    elif edit.kind == "split":
        _edit_split(node, edit, consts, idx_of)
    elif edit.kind == "slice":
        _edit_slice(edit, consts, idx_of)


def _edit_split(node: onnx.NodeProto, edit: Edit, consts: _Constants, idx_of: _Indexer) -> None:
    sizes = np.array([len(idx_of(out, 1)) for out in node.output], dtype=np.int64)
    attrs = [att for att in node.attribute if att.name in ("split", "num_outputs")]
    for att in attrs:
        node.attribute.remove(att)
    if len(node.input) > 1 and node.input[1]:
        consts.set(edit.node, 1, sizes)
    elif any(att.name == "split" for att in attrs) or _opset(consts.model) < 13:
        node.attribute.append(onnx.helper.make_attribute("split", sizes.tolist()))
    else:  # equal split given by output count: make the sizes explicit
        name = f"{node.name or node.output[0]}_split__pruned"
        consts.model.graph.initializer.append(numpy_helper.from_array(sizes, name))
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _edit_slice(edit: Edit, consts: _Constants, idx_of: _Indexer) -> None:
    node = consts.model.graph.node[edit.node]
    starts, ends = consts.get(edit.node, 1).copy(), consts.get(edit.node, 2).copy()
    start = int(starts[edit.axis])
    start = min(max(start + idx_of.full(edit.tensor) if start < 0 else start, 0), idx_of.full(edit.tensor))
    new_start = int(np.searchsorted(idx_of(edit.tensor, 1), start))  # kept channels before the old start
    starts[edit.axis] = new_start
    ends[edit.axis] = new_start + len(idx_of(node.output[0], 1))
    consts.set(edit.node, 1, starts)
    consts.set(edit.node, 2, ends)


def _touches(edit: Edit, model: onnx.ModelProto, idx_of: _Indexer) -> bool:
    if edit.kind == "split":
        return any(idx_of.changed(out) for out in model.graph.node[edit.node].output)
    return idx_of.changed(edit.tensor)


def apply_plan(model: onnx.ModelProto, index: ChannelGroupIndex, keep: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Remove the channels a plan drops, physically (see the module docstring).

    Args:
        model: the model ``index`` was computed from (not mutated).
        index: ``graph_ops.channels.analyze(model)``.
        keep: group id -> kept channel indices (any order); groups not named keep everything.

    Returns:
        A new, verified model with smaller weights and the same inputs and outputs.

    Raises:
        PlanValidationError: the plan or the index does not fit the model.
        VerificationError: the result fails the ONNX checker (a bug: please report it).
    """
    fresh, edits = analyze_with_edits(model)
    check_index(index, fresh)
    plan = fresh.validate_keep(keep)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if plan:
        idx_of = _Indexer(fresh, plan)
        consts = _Constants(out)
        for edit in edits:
            if _touches(edit, out, idx_of):
                _apply_edit(edit, out, consts, idx_of)
        consts.commit()
        log.info("pruned %d groups (%d edits)", len(plan), sum(_touches(e, out, idx_of) for e in edits))
    del out.graph.value_info[:]
    inferred = infer_shapes_light(out).graph
    out.graph.value_info.extend(inferred.value_info)
    for info, fresh in zip(out.graph.output, inferred.output, strict=True):
        info.CopyFrom(fresh)
    verify_model(out)
    return out
