"""Channel rules for tensors that stack branches of the same channels: ``[N, K, C, ...]`` (selective-kernel
attention, SK-ResNet / SKNet).

Selective-kernel attention runs ``K`` convolution paths over one input, each producing the same ``C`` channels,
stacks them (``torch.stack(paths, 1)``: ``Unsqueeze(axes=[1])`` then ``Concat(axis=1)``), sums them over the
branches, derives attention logits for every (branch, channel) from the sum (a producer of ``K*C`` channels viewed
as ``[N, K, C, 1, 1]``, :func:`graph_ops.channel_layout_rules.reshape`), takes the softmax over the branches, and
weighs and sums the stacked paths with it:

    out[n, c] = sum_k softmax_k(z[n, k, c]) * path_k[n, c]

Every quantity of channel ``c`` depends on channel ``c`` of every branch only, so removing channel ``c`` of every
path, both logits rows ``k*C + c`` and every exit weight that reads channel ``c`` of the output is exact (the mask
oracle: the pruned model equals the original with those exit weights zeroed). Analysis therefore unions the
branches' spaces (as for a residual Add) and records the stacked tensors in ``Analysis.branched``: their channels
lie on axis 2 (:meth:`~graph_ops.channel_state.Analysis.channel_axis`), the branch axis 1 never changes.

Each rule here returns True when it handled the node: ``Unsqueeze(axes=[1])`` of an ``[N, C, ...]`` tensor starts a
stack of one branch; ``Unsqueeze`` / ``Squeeze`` of later axes, ``Reduce*`` over the branch or spatial axes,
``Softmax`` over the branch or a spatial axis keep the layout (``Squeeze(axes=[1])`` of one branch and ``Reduce*``
over axis 1 without ``keepdims`` give an ``[N, C, ...]`` tensor again). A ``Transpose`` that moves the stacked
channels (a channel shuffle: ``[N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]``) freezes them: after
pruning, the kept channels of the ``g`` blocks would interleave in another order than in the original, which the
pruned graph cannot reproduce with one plan per group (fail closed, with the reason). Concat, Split, Slice and the
elementwise ops read the channel axis themselves (:mod:`graph_ops.channel_layout_rules`,
:func:`graph_ops.channel_rules.elementwise`); every other op freezes a stacked tensor (``BRANCH_OPS`` lists the ops
allowed to read one).
"""

from __future__ import annotations

import onnx

from graph_ops.channel_state import Analysis, attr, describe, int_list


def _axes(a: Analysis, node: onnx.NodeProto, rank: int | None) -> list[int] | None:
    axes = int_list(a, node, 1, "axes")
    return None if not axes or not rank else sorted(ax % rank for ax in axes)


def _keep(a: Analysis, node: onnx.NodeProto, branched: bool) -> bool:
    x, y = node.input[0], node.output[0]
    a.layout[y] = list(a.layout[x])
    if branched:
        a.branched.add(y)
    return True


def unsqueeze(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Unsqueeze(axes=[1, ...])`` of an ``[N, C, ...]`` tensor (one branch), or of later axes of a stacked one."""
    x = node.input[0]
    axes = _axes(a, node, a.rank(node.output[0]))
    if axes is None or x in a.last_axis:
        return False
    if x in a.branched:
        return all(ax > 2 for ax in axes) and _keep(a, node, True)
    return axes[0] == 1 and all(ax > 2 for ax in axes[1:]) and _keep(a, node, True)


def squeeze(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Squeeze`` of a stacked tensor: of its single branch (axis 1) back to ``[N, C, ...]``, or of later axes."""
    x = node.input[0]
    axes = _axes(a, node, a.rank(x))
    if x not in a.branched or axes is None or any(ax in (0, 2) for ax in axes):
        return False
    if 1 in axes and (a.shapes.get(x) or (None, None))[1] != 1:
        return False
    return _keep(a, node, 1 not in axes)


def reduce(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Reduce*`` of a stacked tensor over the branch axis and / or spatial axes (channel ``c`` stays apart)."""
    x = node.input[0]
    axes = _axes(a, node, a.rank(x))
    if x not in a.branched or axes is None or any(ax in (0, 2) for ax in axes):
        return False
    return _keep(a, node, bool(attr(node, "keepdims", 1)) or 1 not in axes)


def softmax(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """``Softmax`` / ``LogSoftmax`` of a stacked tensor over the branch axis or a spatial one (opset 13 semantics;
    before, the op flattens from its axis, which is channel-wise only from a spatial axis on)."""
    x, rank = node.input[0], a.rank(node.input[0]) or 0
    if x not in a.branched or rank < 3:
        return False
    axis = int(attr(node, "axis", -1 if a.opset >= 13 else 1)) % rank  # type: ignore[arg-type]
    return (axis > 2 or (axis == 1 and a.opset >= 13)) and _keep(a, node, True)


def transpose(a: Analysis, node: onnx.NodeProto, idx: int) -> bool:
    """A stacked tensor transposed: kept when axes 0-2 stay, else frozen as a channel shuffle (see the module
    docstring)."""
    x = node.input[0]
    if x not in a.branched:
        return False
    perm = attr(node, "perm")
    if perm is not None and list(perm)[:3] == [0, 1, 2]:  # type: ignore[call-overload]
        return _keep(a, node, True)
    a.freeze(x, f"channel shuffle at {describe(node, idx)}: the kept channels of its blocks would interleave in "
                f"another order after pruning")
    return True
