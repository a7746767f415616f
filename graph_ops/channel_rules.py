"""Per-op channel rules: ``CHANNEL_RULES`` maps an ONNX op_type to the function that propagates channel spaces.

Each rule reads its inputs' layouts from the :class:`graph_ops.channels.Analysis` state and

* creates a new space for a *source* (Conv ``group=1``, ConvTranspose ``group=1``, Gemm / MatMul with a constant
  2-D weight), with producer edits (weight output axis, bias) and, when its input carries channels, a consumer edit
  (Conv ``W[:, c]``, ConvTranspose ``W[c]``, Gemm / MatMul K axis, in blocks of ``H*W`` after a channel-major
  Flatten / Reshape);
* a grouped Conv (``1 < group``, not depthwise) is a source too, whose input and output must keep the same number
  of channels in each conv group (equal-count blocks, :attr:`graph_ops.groups.ChannelGroup.blocks`); when its input
  carries no tracked channels (the output of an op analysis does not follow, e.g. AlexNet's LRN), only its output
  is pruned, in equal blocks;
* passes the input's layout on for channel-wise ops (``y[:, c]`` depends on ``x[:, c]`` only), turning per-channel
  constants (BN parameters, PRelu slopes, ``[C,1,1]`` Mul/Add operands, depthwise weights) into producer edits;
* unions the spaces of two activations combined elementwise (residual Add, SE gating Mul), refining differently
  segmented layouts to their common refinement (:mod:`graph_ops.channel_spaces`);
* lays segments end to end for Concat on axis 1, cuts them for Split / Slice on segment boundaries, and maps
  channel-major Flatten / Reshape into dense layers (those rules live in ``graph_ops.channel_layout_rules``);
* otherwise freezes every space it touches, with a reason (fail closed).

Ops not in the dict freeze their inputs' spaces ("unsupported consumer <op> at node '<name>'").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

from graph_ops import channel_branch_rules as branches
from graph_ops.channel_layout_rules import concat, flatten, reshape, slice_, split
from graph_ops.channel_shape_rules import channel_entry_ok, tracked
from graph_ops.channel_state import Analysis, Edit, attr, describe, int_list, node_name, static_prod

Rule = Callable[[Analysis, onnx.NodeProto, int], None]


def _extra_outputs_used(a: Analysis, node: onnx.NodeProto) -> bool:
    return any(o and (o in a.readers or o in a.outputs) for o in node.output[1:])


def passthrough(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Channel-wise unary op: the output has the input's layout."""
    lay = a.lay(node.input[0])
    if lay is None:
        return
    if _extra_outputs_used(a, node):
        a.freeze(node.input[0], f"unsupported extra output of {describe(node, idx)}")
        return
    a.layout[node.output[0]] = list(lay)
    a.mark_like(node.input[0], node.output[0])


def _frozen_source(a: Analysis, node: onnx.NodeProto, idx: int, reason: str) -> None:
    a.freeze_inputs(node, reason)
    shape = a.shapes.get(node.output[0])
    if shape and len(shape) >= 2 and shape[1]:
        a.new_space(node.output[0], shape[1], node_name(node, idx), frozen=reason)


def conv(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Conv: a source when ``group=1``, pass-through when depthwise, per-conv-group when grouped."""
    x, w, y, name = node.input[0], node.input[1], node.output[0], node_name(node, idx)
    wshape, yshape = a.shapes.get(w), a.shapes.get(y)
    if not a.is_const(w) or not wshape:
        _frozen_source(a, node, idx, f"weight of {describe(node, idx)} is not constant")
        return
    group, lay = int(attr(node, "group", 1)), a.lay(x)  # type: ignore[arg-type]
    c_out, c_in_g, k = wshape[0], wshape[1], math.prod(wshape[2:])
    spatial = static_prod(yshape[2:]) if yshape else None
    bias, known = (1.0 if len(node.input) > 2 and node.input[2] else 0.0), spatial is not None
    if group == 1:
        if lay:
            a.slot(node, idx, 1, x, 1, role="consumer")
            a.exits.append((name, x))
        a.new_space(y, c_out, name)
        a.slot(node, idx, 1, y, 0)
        a.slot(node, idx, 2, y, 0)
        a.add_cost(name, "Conv", k * (spatial or 0), k, 0 if lay else c_in_g, x if lay else None, 0, y, bias,
                   macs_known=known)
    elif c_in_g == 1 and group == c_out and lay and a.channels(x) == group:
        a.layout[y] = list(lay)
        a.slot(node, idx, 1, x, 0)
        a.slot(node, idx, 2, x, 0)
        a.edits.append(Edit("group", idx, x))
        a.add_cost(name, "Conv", k * (spatial or 0), k, 1, None, 0, y, bias, macs_known=known)
    elif lay and a.channels(x) == group * c_in_g and c_out % group == 0:
        _grouped_conv(a, node, idx, group, k * (spatial or 0), known)
    elif lay is None and c_out % group == 0 and c_out > group:  # input not followed (e.g. after LRN): fixed
        a.new_space(y, c_out, name)
        a.slot(node, idx, 1, y, 0)
        a.slot(node, idx, 2, y, 0)
        a.blocks.append((y, group, f"'{name}'"))
        a.add_cost(name, "Conv", k * (spatial or 0), k, c_in_g, None, 0, y, bias, macs_known=known)
    else:
        kind = "depthwise Conv" if c_in_g == 1 and group == c_out else f"Conv (group={group})"
        reason = f"{kind} at '{name}' reads channels without a layout"
        _frozen_source(a, node, idx, reason)
        out = (0, y) if y in a.layout else (c_out, None)
        a.add_cost(name, "Conv", k * (spatial or 0), k, c_in_g, None, *out, bias, macs_known=known)


def _grouped_conv(a: Analysis, node: onnx.NodeProto, idx: int, group: int, macs_per_pair: float,
                  known: bool) -> None:
    """Grouped Conv (``1 < group``, not depthwise): output channels form a new space, and both the input and the
    output keep the same number of channels in each of the ``group`` conv groups (``Analysis.blocks``), so the
    pruned layer is again a grouped conv with ``group`` groups. The weight ``[C_out, C_in/group, k...]`` loses
    rows (output side) and, per row, the columns of the removed input channels of its own conv group (a
    ``"grouped"`` consumer edit). MACs ``= k * spatial * C_in * C_out / group``.
    """
    x, y, name = node.input[0], node.output[0], node_name(node, idx)
    where = f"'{name}'"
    k = math.prod((a.shapes.get(node.input[1]) or ())[2:])
    a.slot(node, idx, 1, x, 1, role="consumer", kind="grouped")  # before the row edit: per-row columns of W
    a.exits.append((name, x))
    a.new_space(y, (a.shapes.get(node.input[1]) or (0,))[0], name)
    a.slot(node, idx, 1, y, 0)
    a.slot(node, idx, 2, y, 0)
    a.blocks.extend([(x, group, where), (y, group, where)])
    bias = 1.0 if len(node.input) > 2 and node.input[2] else 0.0
    a.add_cost(name, "Conv", macs_per_pair, k, 0, x, 0, y, bias, divisor=group, macs_known=known)


def conv_transpose(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """ConvTranspose with ``group=1``: W is ``[C_in, C_out, k...]``; other groups freeze."""
    x, w, y, name = node.input[0], node.input[1], node.output[0], node_name(node, idx)
    wshape, xshape = a.shapes.get(w), a.shapes.get(x)
    if not a.is_const(w) or not wshape or int(attr(node, "group", 1)) != 1:  # type: ignore[arg-type]
        _frozen_source(a, node, idx, f"grouped or dynamic ConvTranspose at '{name}'")
        return
    lay, k = a.lay(x), math.prod(wshape[2:])
    if lay:
        a.slot(node, idx, 1, x, 0, role="consumer")
        a.exits.append((name, x))
    a.new_space(y, wshape[1], name)
    a.slot(node, idx, 1, y, 1)
    a.slot(node, idx, 2, y, 0)
    spatial = static_prod(xshape[2:]) if xshape else None
    bias = 1.0 if len(node.input) > 2 and node.input[2] else 0.0
    a.add_cost(name, "ConvTranspose", k * (spatial or 0), k, 0 if lay else wshape[0], x if lay else None, 0, y, bias,
               macs_known=spatial is not None)


def _dense(a: Analysis, node: onnx.NodeProto, idx: int, k_axis: int, n: int, k: int) -> None:
    """Shared part of Gemm / MatMul with a constant weight: consumer edit on the K axis, new output space."""
    x, y, name = node.input[0], node.output[0], node_name(node, idx)
    flat, lay, block = a.flat.get(x), a.lay(x), 1
    src = None
    if flat:
        src, block = flat
    elif lay:
        src = x
    if src:
        a.slot(node, idx, 1, src, k_axis, role="consumer", block=block)
        a.exits.append((name, src))
    a.new_space(y, n, name)
    a.slot(node, idx, 1, y, 1 - k_axis)
    bias = 0.0
    if len(node.input) > 2 and node.input[2]:
        cshape = a.shapes.get(node.input[2]) or ()
        if cshape and cshape[-1] == n and math.prod(cshape) == n:
            a.slot(node, idx, 2, y, len(cshape) - 1)
            bias = 1.0
        else:
            a.freeze(y, f"bias of {describe(node, idx)} is not per-channel")
    a.add_cost(name, node.op_type, block, block, 0 if src else k, src, 0, y, bias)


def gemm(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Gemm with a constant B (respects transB); transA or a dynamic B freezes."""
    b = node.input[1]
    bshape = a.shapes.get(b)
    if not a.is_const(b) or not bshape or len(bshape) != 2 or attr(node, "transA", 0):
        _frozen_source(a, node, idx, f"unsupported Gemm (transA or dynamic B) at '{node_name(node, idx)}'")
        return
    trans_b = bool(attr(node, "transB", 0))
    n, k = (bshape[0], bshape[1]) if trans_b else (bshape[1], bshape[0])
    _dense(a, node, idx, 1 if trans_b else 0, n, k)


def matmul(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """MatMul of a 2-D activation by a constant 2-D weight ``[K, N]``, or of an N-D activation whose features lie
    on its last axis and whose axis 0 is the batch (tokens, channels-last maps: :func:`_token_dense`); anything else
    freezes (an N-D MatMul by a constant still gets its cost term, with fixed widths)."""
    x, b, name = node.input[0], node.input[1], node_name(node, idx)
    bshape = a.shapes.get(b)
    rank = a.rank(x)
    dense = bool(a.is_const(b) and bshape and len(bshape) == 2)
    if dense and (x in a.flat or rank == 2):
        _dense(a, node, idx, 0, bshape[1], bshape[0])
        return
    if not (dense and rank is not None and rank >= 3):
        a.freeze_inputs(node, f"unsupported consumer MatMul at node '{name}'")
        return
    tokens = static_prod((a.shapes.get(x) or (None, None))[1:-1])  # positions per sample (None: dynamic)
    on_last = x in a.last_axis or a.channel_axis(x) == rank - 1
    if (a.lay(x) is None or on_last) and a.batch_major(x):
        if a.lay(x):
            a.last_axis.add(x)  # a map transposed to channels-last: calibration pools it as the Linear's input
        _token_dense(a, node, idx, bshape[0], bshape[1], tokens)
        return
    a.freeze_inputs(node, f"unsupported consumer MatMul at node '{name}'")
    a.add_cost(name, "MatMul", float(tokens or 0), 1, bshape[0], None, bshape[1], None, 0.0,  # fixed widths
               macs_known=tokens is not None)


def _token_dense(a: Analysis, node: onnx.NodeProto, idx: int, k: int, n: int, tokens: int | None) -> None:
    """``y[..., :] = x[..., :] @ W`` with ``W [K, N]`` constant and ``x`` of rank >= 3: a Linear on the last axis.

    The output's ``N`` features, on its last axis, are a new space (producer edit: ``W[:, c]``); when ``x`` carries
    last-axis channels, ``W``'s rows are its consumer edit. MACs per sample: ``tokens * K * N`` with ``tokens`` the
    product of the axes between the batch and the features (None: unknown, they are dynamic)."""
    x, y, name = node.input[0], node.output[0], node_name(node, idx)
    if a.lay(x):
        a.slot(node, idx, 1, x, 0, role="consumer")
        a.exits.append((name, x))
    a.new_space(y, n, name)
    a.last_axis.add(y)
    a.slot(node, idx, 1, y, 1)
    a.add_cost(name, "MatMul", float(tokens or 0), 1, 0 if a.lay(x) else k, x if a.lay(x) else None, 0, y, 0.0,
               macs_known=tokens is not None)


def _per_channel_const(a: Analysis, node: onnx.NodeProto, idx: int, pos: int, x: str, rank: int) -> bool:
    """Check constant input ``pos`` broadcasts onto ``x``; add a slot when it varies along ``x``'s channel axis."""
    shape = a.shapes.get(node.input[pos])
    if shape is None or len(shape) > rank:
        a.freeze(x, f"unsupported constant operand of {describe(node, idx)}")
        return False
    axis = len(shape) - (rank - a.channel_axis(x))
    if axis < 0 or shape[axis] == 1:
        return True
    if shape[axis] == a.channels(x):
        return a.slot(node, idx, pos, x, axis)
    a.freeze(x, f"constant operand of {describe(node, idx)} does not broadcast on channels")
    return False


def _broadcast_on_channels(a: Analysis, tensor: str, rank: int, width: int | None, channel_axis: int = 1) -> bool:
    """True when an operand has no channel axis of its own in the output (absent, or 1 broadcast to ``width``);
    ``channel_axis``: the output's."""
    shape = a.shapes.get(tensor)
    if shape is None or width in (None, 1):
        return False
    axis = len(shape) - (rank - channel_axis)
    return axis < 0 or shape[axis] == 1


def elementwise(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """Add/Sub/Mul/Div/Pow/Max/Min/Sum/Mean/PRelu: join the activations' layouts (refining them to a common
    segmentation), slice per-channel constants; an activation broadcast over channels (one channel, e.g. a spatial
    attention map) is only read (its own one-channel group is frozen: it cannot shrink)."""
    names = [t for t in node.input if t]
    acts = [t for t in names if not a.is_const(t)]
    if not any(a.lay(t) for t in acts):
        return
    where, y = describe(node, idx), node.output[0]
    rank = a.rank(y)
    laid = [t for t in acts if a.lay(t)]
    moved = any(t in a.last_axis or t in a.branched for t in laid)  # channels on another axis than 1
    axis = max(a.channel_axis(t) for t in laid) if moved else 1
    width = (a.shapes.get(y) or ())[axis] if rank and rank > axis else None
    wide = [t for t in acts if rank is None or not _broadcast_on_channels(a, t, rank, width, axis)]
    if moved and any(a.lay(t) and a.channel_axis(t) != axis for t in wide):
        a.freeze_inputs(node, f"channels on different axes at {where}")
        return
    if rank is None or not wide or any(a.lay(t) is None or a.rank(t) != rank for t in wide):
        # a full-width operand the analysis could not follow (e.g. back from a channels-last LayerNorm) is not a
        # broadcast: say so, as Concat does
        untracked = rank is not None and any(a.lay(t) is None and a.rank(t) == rank for t in wide)
        a.freeze_inputs(node, f"{'input without channel layout' if untracked else 'broadcast over channels'} at {where}")
        return
    if any(a.channels(t) != a.channels(wide[0]) for t in wide):
        a.freeze_inputs(node, f"broadcast over channels at {where}")
        return
    for narrow in set(acts) - set(wide):  # its one channel is broadcast to all: it can never shrink
        a.freeze(narrow, f"broadcast over channels at {where}")
    for other in wide[1:]:
        a.union_layouts(wide[0], other, where)
    for pos, name in enumerate(node.input):
        if name and a.is_const(name):
            _per_channel_const(a, node, idx, pos, wide[0], rank)
    a.layout[y] = list(a.layout[wide[0]])
    a.mark_like(wide[0], y)
    if node.op_type == "PRelu" and a.edits and a.edits[-1].node == idx:
        a.add_cost(node_name(node, idx), "PRelu", 0, 1, 1, None, 0, wide[0])


def batchnorm(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
    """BatchNormalization / InstanceNormalization: channel-wise, parameters are producer-side slots."""
    x = node.input[0]
    if a.lay(x) is None:
        return
    for pos in range(1, len(node.input)):
        a.slot(node, idx, pos, x, 0)
    passthrough(a, node, idx)
    if node.op_type == "BatchNormalization":
        a.add_cost(node_name(node, idx), "BatchNormalization", 0, 2, 1, None, 0, x)


def _axes_rule(allowed: Callable[[Analysis, onnx.NodeProto, int], bool],
               stacked: Callable[[Analysis, onnx.NodeProto, int], bool] | None = None) -> Rule:
    """A pass-through rule guarded by a predicate that says the op leaves axes 0 and 1 alone; ``stacked`` handles
    the tensors of branches stacked on axis 1 first (:mod:`graph_ops.channel_branch_rules`)."""

    def rule(a: Analysis, node: onnx.NodeProto, idx: int) -> None:
        x = node.input[0]
        if a.lay(x) is None or (stacked is not None and stacked(a, node, idx)):
            return
        if a.channel_axis(x) == 1 and allowed(a, node, a.rank(x) or 0):
            passthrough(a, node, idx)
        else:
            a.freeze(x, f"unsupported consumer {node.op_type} at node '{node_name(node, idx)}'")

    rule.__doc__ = allowed.__doc__
    return rule


def _reduce_ok(a: Analysis, node: onnx.NodeProto, rank: int) -> bool:
    """Reduce* over spatial axes only."""
    axes = int_list(a, node, 1, "axes")
    return bool(axes) and rank > 2 and all(ax % rank > 1 for ax in axes)  # type: ignore[union-attr]


def _squeeze_ok(a: Analysis, node: onnx.NodeProto, rank: int) -> bool:
    """Squeeze / Unsqueeze of axes after the channel axis."""
    axes = int_list(a, node, 1, "axes")
    out_rank = rank + len(axes) if node.op_type == "Unsqueeze" and axes else rank
    return bool(axes) and rank > 0 and all(ax % out_rank > 1 for ax in axes)  # type: ignore[union-attr]


def _transpose_ok(a: Analysis, node: onnx.NodeProto, rank: int) -> bool:
    """Transpose that keeps axes 0 and 1 in place."""
    perm = attr(node, "perm")
    return perm is not None and list(perm)[:2] == [0, 1]  # type: ignore[call-overload]


def _softmax_ok(a: Analysis, node: onnx.NodeProto, rank: int) -> bool:
    """Softmax-like op over an axis after the channel axis (pre-13 semantics flatten from ``axis``)."""
    axis = int(attr(node, "axis", -1 if a.opset >= 13 else 1)) % max(rank, 1)  # type: ignore[arg-type]
    return axis > 1


def _pad_ok(a: Analysis, node: onnx.NodeProto, rank: int) -> bool:
    """Pad that pads spatial axes only (pads constant, or computed at run time from sizes with the integer 0 on the
    batch and channel axes: TF "same" padding; any mode, each channel is padded from itself)."""
    given = attr(node, "pads") is not None or len(node.input) < 2 or a.is_const(node.input[1])
    pads = int_list(a, node, 1, "pads") if given else tracked(a, node.input[1])
    axes = int_list(a, node, 3, "_none_") or list(range(rank))
    if pads is None or len(pads) != 2 * len(axes):
        return False
    n = len(axes)
    return all(pads[i] == 0 and pads[i + n] == 0 for i, ax in enumerate(axes) if ax % rank < 2)


def _resize_ok(a: Analysis, node: onnx.NodeProto, rank: int) -> bool:
    """Resize / Upsample with scale 1 (or size unchanged) on axes 0 and 1."""
    axes = [ax % rank for ax in (attr(node, "axes") or range(rank))]  # type: ignore[union-attr]
    pos = 1 if node.op_type == "Upsample" or a.opset < 11 else 2
    scales = a.const(node.input[pos]) if len(node.input) > pos and node.input[pos] else None
    if scales is not None and scales.size:
        return scales.size == len(axes) and all(float(s) == 1.0 for s, ax in zip(scales.ravel(), axes, strict=True)
                                                if ax < 2)
    x, xshape = node.input[0], a.shapes.get(node.input[0]) or ()
    entries = channel_entry_ok(a, node, 3, x) if node.input[3:4] and node.input[3] in a.dims else None
    if entries is not None and len(entries) == rank == len(axes):  # sizes read at run time, e.g. Shape(x)[:2] + [H, W]
        return entries[1] == (x, 1) and entries[0] in ((x, 0), xshape[0] if xshape else -1)
    sizes = int_list(a, node, 3, "_none_")
    return sizes is not None and 1 not in axes and all(ax != 0 or sizes[i] == xshape[0]
                                                       for i, ax in enumerate(axes))


_UNARY = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh",
          "Softplus", "Softsign", "Gelu", "Erf", "Mish", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Cast",
          "Identity", "Dropout", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Relu6",
          "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu")
_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
LAST_AXIS_OPS = frozenset({*_UNARY, *_BINARY, "MatMul"} - {*_POOLS, "PRelu"})
"""Ops that may read a tensor whose channels lie on its last axis: the elementwise ones (not the pools, which reduce
axes 2.., nor PRelu, whose slope runs along axis 1) and ``MatMul``; any other op freezes such a tensor's channels."""
_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
           "ReduceSumSquare", "ReduceProd")
BRANCH_OPS = frozenset({*_UNARY, *_BINARY, *_REDUCE, "Concat", "Split", "Slice", "Reshape", "Transpose", "Squeeze",
                        "Unsqueeze", "Softmax", "LogSoftmax", "MatMul"} - {*_POOLS, "PRelu"})
"""Ops that may read a tensor whose channels lie on another axis than 1 (stacked branches, channels-last maps:
:mod:`graph_ops.channel_branch_rules`): the elementwise ones and those that know its axes (MatMul by a constant
reads channels on the last axis as a Linear's input); any other op freezes its channels."""

CHANNEL_RULES: dict[str, Rule] = {
    **dict.fromkeys(_UNARY, passthrough),
    **dict.fromkeys(_BINARY, elementwise),
    **dict.fromkeys(_REDUCE, _axes_rule(_reduce_ok, branches.reduce)),
    "Squeeze": _axes_rule(_squeeze_ok, branches.squeeze),
    "Unsqueeze": _axes_rule(_squeeze_ok, branches.unsqueeze),
    **dict.fromkeys(("Softmax", "LogSoftmax"), _axes_rule(_softmax_ok, branches.softmax)),
    "Hardmax": _axes_rule(_softmax_ok),
    **dict.fromkeys(("Resize", "Upsample"), _axes_rule(_resize_ok)),
    "Transpose": _axes_rule(_transpose_ok, branches.transpose),
    "Pad": _axes_rule(_pad_ok),
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    "BatchNormalization": batchnorm,
    "InstanceNormalization": batchnorm,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Flatten": flatten,
    "Reshape": reshape,
}
"""op_type -> rule; ops not listed freeze every channel space among their inputs."""
