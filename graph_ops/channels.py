"""Channel-group analysis: which channels of which tensors must be removed together (style.md 1.5).

Every activation tensor with a channel axis (axis 1 of NCHW / NC) is described as a run of segments, each a contiguous
slice of one *channel space*. Sources (Conv with ``group=1``, grouped Conv, ConvTranspose, Gemm / MatMul with a
constant weight) create a new space; channel-wise ops pass their input's space on; an elementwise op of two
activations unions the spaces (union-find); Concat on axis 1 lays its inputs' segments end to end; Split / Slice keep
a range. Where ranges do not fall on piece boundaries, spaces are cut into pieces (the common refinement,
:mod:`graph_ops.channel_spaces`); every final piece is a group. A grouped Conv asks its input and output groups to
keep the same number of channels in each of its conv groups (``ChannelGroup.blocks``). The per-op rules are the
plain dict ``graph_ops.channel_rules.CHANNEL_RULES`` (integer shape arithmetic: ``channel_shape_rules``; channels
moved to another axis by a transpose or a view into branches: ``channel_branch_rules``). ``shapes`` may be the
shapes at fixed input sizes of a model with dynamic dims (:func:`graph_ops.dynamic_dims.shapes_at`): the rules only
accept what stays exact at every size. Anything
the rules do not understand *freezes* the channels it touches, with a readable reason (fail closed): a frozen group
is never pruned.

Removing channel ``c`` of a group is exact when every tensor that carries the group loses that channel and every
weight that reads it (the *consumer* slots: Conv ``W[:, c]``, Gemm K rows, ``H*W`` blocks after Flatten) loses the
matching slice: the removed channel then reaches no output, which is what the mask oracle
(:mod:`graph_ops.mask`) checks numerically.

The :class:`~graph_ops.groups.ChannelGroupIndex` also records the :class:`~graph_ops.groups.Edit` s that a plan
implies (which initializer, along which axis, driven by which tensor's kept channels) and the analysed graph's
fingerprint, so :mod:`graph_ops.prune`, :mod:`graph_ops.mask` and recovery apply a plan without analysing again. The
working state and the shared rule helpers live in :mod:`graph_ops.channel_state`.

Preconditions: a topologically sorted graph (ONNX requires it). A canonical model (graph_ops.canonicalize) gives
the most prunable groups; on other models, weights that are not initializers, or exit weights shared between nodes,
freeze the groups concerned. A Conv/Gemm without bias is fine (nothing to slice); a shared bias or BN parameter is
fine too (surgery gives each reader its own sliced copy).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx

from graph_ops.channel_rules import BRANCH_OPS, CHANNEL_RULES, LAST_AXIS_OPS
from graph_ops.channel_shape_rules import track_shapes
from graph_ops.channel_state import Analysis
from graph_ops.groups import ChannelGroupIndex
from graph_ops.proto import Shape, fingerprint, node_name, static_shapes

log = logging.getLogger(__name__)


def analyze(model: onnx.ModelProto, shapes: Mapping[str, Shape] | None = None) -> ChannelGroupIndex:
    """Find the channel groups of a model (see the module docstring).

    Args:
        model: an ONNX model, ideally canonical (graph_ops.canonicalize); it is not modified.
        shapes: the model's static shapes when the caller already has fresh ones (a canonical model's declared
            shapes, :func:`graph_ops.proto.declared_shapes`); default: shape inference on a light copy.

    Returns:
        The groups in topological order, each tensor's channel layout, the bilinear cost model, the edits a plan
        implies and the graph's fingerprint.
    """
    state = Analysis(model, static_shapes(model) if shapes is None else shapes)
    state.run(CHANNEL_RULES, track_shapes, LAST_AXIS_OPS, BRANCH_OPS)
    index = state.finish(fingerprint(model))
    frozen = sum(1 for g in index.groups if g.frozen)
    log.debug("analysis: %d groups (%d frozen), %d edits", len(index.groups), frozen, len(index.edits))
    return index


def producer_weights(model: onnx.ModelProto, index: ChannelGroupIndex) -> dict[str, tuple[str, int, str]]:
    """Producer node name -> (weight initializer name, output-channel axis, the tensor whose layout maps the
    weight's rows to group channels), read off the surgery's own edits.

    This is what the data-free scorers (``l1``, ``l2``) need: the rows of each producer's weight that make a channel
    (after refinement a producer's rows may hold several groups: ``index.by_tensor[tensor]`` says which).
    ``index`` is ``analyze(model)`` (checked by fingerprint).
    """
    index.check_model(fingerprint(model))
    producers = {name for group in index.groups for name in group.producers}
    weights: dict[str, tuple[str, int, str]] = {}
    for edit in index.edits:
        node = model.graph.node[edit.node]
        name = node_name(node, edit.node)
        if edit.kind == "take" and edit.role == "producer" and edit.pos == 1 and name in producers:
            weights.setdefault(name, (node.input[1], edit.axis, edit.tensor))
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
