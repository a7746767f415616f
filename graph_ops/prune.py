"""Physical channel removal: ``apply_plan(model, index, keep)``.

A plan keeps, for some groups, a subset of their channels (sorted indices). For every tensor ``t`` whose layout
holds segments of those groups, the kept indices along axis 1 are ``offset + (k - start)`` for each kept channel ``k``
of each segment (:func:`kept_indices`). Surgery applies the edits recorded by analysis with those
indices: ``np.take`` of initializers along the recorded axis (producer rows and biases, BN / PRelu / Mul constants,
depthwise weights, consumer input slices, Gemm K rows in blocks of ``H*W``), grouped-Conv weight columns per conv
group (:func:`grouped_columns`), depthwise ``group = len(keep)``, Split sizes, Slice starts/ends on axis 1,
Reshape / Resize integer vectors. Concat needs nothing (its inputs shrink).

Exactness: every removed channel is removed from every tensor that carries it and from every weight that reads it,
so the pruned model computes exactly what the original computes with those channels' exit weights zeroed
(:func:`graph_ops.mask.zero_channels`), up to floating-point summation order.

Preconditions: ``index`` is ``analyze(model)`` (checked by the graph's fingerprint; the edits it recorded are
applied, nothing is analysed again). New initializers are named ``<orig>__pruned`` (never edited in place); the
input model is not mutated.

Shapes: only the channel axis of the tensors whose layout holds a pruned group changes (every other path freezes its
groups), and a channel-major flattened input of a dense head changes by ``block`` entries per channel, so the
pruned model's ``value_info`` is the original's with those dims rewritten (:func:`pruned_channels`); shape
inference runs only when the original declares no complete shapes. The result passes ``onnx.checker`` full check,
whose strict shape inference confirms every declared shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.groups import ChannelGroupIndex, Edit, Segment
from graph_ops.io import verify_model
from graph_ops.proto import (
    complete_shapes,
    constants,
    fingerprint,
    infer_shapes_light,
    opset,
    replace_initializers,
)

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


class _Constants:
    """New values for node inputs, written as fresh initializers at the end (originals are never edited)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.constants = constants(model)
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
        """Write each edited input as a new initializer ``<orig>__pruned`` (see ``replace_initializers``)."""
        replace_initializers(self.model, self.pending, "__pruned")


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
    elif edit.kind == "grouped":
        value = consts.get(edit.node, edit.pos)
        consts.set(edit.node, edit.pos, grouped_columns(value, _group_attr(node), idx_of(edit.tensor, 1),
                                                        idx_of.full(edit.tensor)))
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


def _group_attr(node: onnx.NodeProto) -> int:
    return next((att.i for att in node.attribute if att.name == "group"), 1)


def grouped_columns(weight: np.ndarray, group: int, kept: np.ndarray, c_in: int) -> np.ndarray:
    """Weight ``[C_out, C_in/group, k...]`` of a grouped Conv restricted, row by row, to the kept input channels of
    the row's own conv group (the plan keeps the same number in every conv group)."""
    cin_g, cout_g = c_in // group, weight.shape[0] // group
    cols = np.stack([kept[(kept >= g * cin_g) & (kept < (g + 1) * cin_g)] - g * cin_g for g in range(group)])
    rows = cols[np.arange(weight.shape[0]) // cout_g]
    index = rows.reshape(rows.shape + (1,) * (weight.ndim - 2))
    return np.take_along_axis(weight, np.broadcast_to(index, rows.shape + weight.shape[2:]), axis=1)


def _edit_split(node: onnx.NodeProto, edit: Edit, consts: _Constants, idx_of: _Indexer) -> None:
    sizes = np.array([len(idx_of(out, 1)) for out in node.output], dtype=np.int64)
    attrs = [att for att in node.attribute if att.name in ("split", "num_outputs")]
    for att in attrs:
        node.attribute.remove(att)
    if len(node.input) > 1 and node.input[1]:
        consts.set(edit.node, 1, sizes)
    elif any(att.name == "split" for att in attrs) or opset(consts.model) < 13:
        node.attribute.append(onnx.helper.make_attribute("split", sizes.tolist()))
    else:  # equal split given by output count: make the sizes explicit
        name = f"{node.name or node.output[0]}_split__pruned"
        consts.model.graph.initializer.append(numpy_helper.from_array(sizes, name))
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name


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


def pruned_channels(index: ChannelGroupIndex, plan: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Channel-axis size (:meth:`~graph_ops.groups.ChannelGroupIndex.channel_axis`) of every tensor the plan shrinks
    (layouts with a pruned group; flattened dense-head inputs)."""
    sizes = {name: len(kept_indices(segs, dict(plan))) for name, segs in index.by_tensor.items()
             if any(seg.group_id in plan for seg in segs)}
    for name, (source, block) in index.flattened.items():
        if source in sizes:
            sizes[name] = sizes[source] * block
    return sizes


def _set_value_info(out: onnx.ModelProto, index: ChannelGroupIndex, plan: Mapping[str, np.ndarray]) -> None:
    """Declared shapes of the pruned model: the original's with the shrunk channel dims (module docstring)."""
    if not complete_shapes(out):
        del out.graph.value_info[:]
        inferred = infer_shapes_light(out).graph
        out.graph.value_info.extend(inferred.value_info)
        for info, fresh in zip(out.graph.output, inferred.output, strict=True):
            info.CopyFrom(fresh)
        return
    sizes = pruned_channels(index, plan)
    for info in [*out.graph.value_info, *out.graph.output]:
        if info.name in sizes:
            dims = info.type.tensor_type.shape.dim
            if dims:  # a tensor whose rank inference left unknown declares no dims to rewrite
                dims[index.channel_axis(info.name, len(dims))].dim_value = sizes[info.name]


def apply_plan(model: onnx.ModelProto, index: ChannelGroupIndex, keep: Mapping[str, Sequence[int]], *,
               verify: bool = True) -> onnx.ModelProto:
    """Remove the channels a plan drops, physically (see the module docstring).

    Args:
        model: the model ``index`` was computed from (not mutated).
        index: ``graph_ops.channels.analyze(model)`` (its edits are applied; checked by fingerprint).
        keep: group id -> kept channel indices (any order); groups not named keep everything.
        verify: run the full ONNX checker on the result (always on, except for callers that verify later).

    Returns:
        A new model with smaller weights, the same inputs and outputs, and declared shapes.

    Raises:
        PlanValidationError: the plan or the index does not fit the model.
        VerificationError: the result fails the ONNX checker (a bug: please report it).
    """
    index.check_model(fingerprint(model))
    plan = index.validate_keep(keep)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if plan:
        idx_of = _Indexer(index, plan)
        consts = _Constants(out)
        touched = [edit for edit in index.edits if _touches(edit, out, idx_of)]
        for edit in touched:
            _apply_edit(edit, out, consts, idx_of)
        consts.commit()
        log.info("pruned %d groups (%d edits)", len(plan), len(touched))
    _set_value_info(out, index, plan)
    if verify:
        verify_model(out)
    return out
