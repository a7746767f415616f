"""Channel rules for tensors whose channels lie on another axis than 1: stacked branches ``[N, K, C, ...]``
(selective-kernel and split attention: SK-ResNet, SKNet, ResNeSt) and maps transposed to channels-last.

Selective-kernel attention runs ``K`` convolution paths over one input, each producing the same ``C`` channels,
stacks them (``torch.stack(paths, 1)``: ``Unsqueeze(axes=[1])`` then ``Concat(axis=1)``; split attention views one
grouped conv's ``K*C`` outputs as ``[N, K, C, H, W]``), sums them over the branches, derives attention logits for
every (branch, channel) from the sum (a producer of ``K*C`` channels viewed as ``[N, K, C, 1, 1]``, or as ``[N, 1,
K, C]`` then transposed, :func:`graph_ops.channel_layout_rules.reshape`), takes the softmax over the branches, and
weighs and sums the stacked paths with it:

    out[n, c] = sum_k softmax_k(z[n, k, c]) * path_k[n, c]

Every quantity of channel ``c`` depends on channel ``c`` of every branch only, so removing channel ``c`` of every
path, every logits row ``k*C + c`` and every exit weight that reads channel ``c`` of the output is exact (the mask
oracle: the pruned model equals the original with those exit weights zeroed). Analysis unions the branches' spaces
(as for a residual Add) and records where a tensor's channels lie (``Analysis.branched``: tensor -> axis,
:meth:`~graph_ops.channel_state.Analysis.channel_axis`); every other axis but the batch holds branches or positions.

Each rule here handles any channel axis and returns True when it handled the node: ``Unsqueeze`` / ``Squeeze`` of
other axes (``Unsqueeze(axes=[1])`` of ``[N, C, ...]`` starts a stack of one branch), ``Reduce*`` over other axes
(over the branches: their sum), ``Softmax`` / ``LogSoftmax`` over another axis, ``Transpose`` keeping the batch
first (the channels move with their axis: NCHW -> NHWC gives channels on the last axis, which a ``MatMul`` by a
constant may then read as a Linear's input). Reshapes that split or merge the channel axis with the axes *before*
it are followed in :mod:`graph_ops.channel_layout_rules`; merging it with an axis *after* it interleaves channels
(a channel shuffle, ``[N, C/g, g, H, W] -> [N, C, H, W]``) and freezes, with the reason: after pruning, the kept
channels of the ``g`` blocks would interleave in another order than in the original, which one plan per group
cannot reproduce. Concat, Split, Slice and the elementwise ops read the channel axis themselves; every other op
freezes such a tensor (``BRANCH_OPS`` in :mod:`graph_ops.channel_rules` lists the ops allowed to read one).
"""

from __future__ import annotations

import onnx

from graph_ops.channel_state import Analysis, attr, int_list


def _axes(a: Analysis, node: onnx.NodeProto, rank: int | None) -> list[int] | None:
    axes = int_list(a, node, 1, "axes")
    return None if not axes or not rank else sorted(ax % rank for ax in axes)


def _keep(a: Analysis, node: onnx.NodeProto, axis: int) -> bool:
    """The output holds the input's layout, its channels on ``axis``."""
    x, y = node.input[0], node.output[0]
    a.layout[y] = list(a.layout[x])
    a.set_axis(y, axis)
    return True


def unsqueeze(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Unsqueeze`` of axes other than the batch: the channels move to their axis's new position."""
    x = node.input[0]
    axes = _axes(a, node, a.rank(node.output[0]))
    if axes is None or 0 in axes or x in a.last_axis:
        return False
    cax = a.channel_axis(x)
    kept = [pos for pos in range(len(axes) + (a.rank(x) or 0)) if pos not in axes]
    return _keep(a, node, kept[cax])


def squeeze(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Squeeze`` of unit axes other than the batch and the channels."""
    x = node.input[0]
    axes, cax, shape = _axes(a, node, a.rank(x)), a.channel_axis(x), a.shapes.get(node.input[0]) or ()
    if axes is None or x in a.last_axis or 0 in axes or cax in axes or any(
            len(shape) > ax and shape[ax] not in (1, None) for ax in axes):
        return False
    return _keep(a, node, cax - sum(ax < cax for ax in axes))


def reduce(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Reduce*`` over axes other than the batch and the channels (over branches: channel ``c`` stays apart)."""
    x = node.input[0]
    axes, cax = _axes(a, node, a.rank(x)), a.channel_axis(x)
    if axes is None or x in a.last_axis or 0 in axes or cax in axes:
        return False
    return _keep(a, node, cax if attr(node, "keepdims", 1) else cax - sum(ax < cax for ax in axes))


def softmax(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Softmax`` / ``LogSoftmax`` over an axis other than the batch and the channels (opset 13 semantics; before,
    the op flattens from its axis, which is channel-wise only from after the channel axis on)."""
    x, rank = node.input[0], a.rank(node.input[0]) or 0
    cax = a.channel_axis(x)
    if x in a.last_axis or rank < 2:
        return False
    axis = int(attr(node, "axis", -1 if a.opset >= 13 else 1)) % rank  # type: ignore[arg-type]
    ok = axis > cax if a.opset < 13 else axis not in (0, cax)
    return ok and _keep(a, node, cax)


def transpose(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Transpose`` that keeps the batch first: the channels move with their axis."""
    x, perm = node.input[0], attr(node, "perm")
    order = [int(p) for p in perm] if perm is not None else []  # type: ignore[union-attr]
    if not order or order[0] != 0 or x in a.last_axis:
        return False
    return _keep(a, node, order.index(a.channel_axis(x)))
