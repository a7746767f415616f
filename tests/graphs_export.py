"""Motifs of production exports as shipped: Paddle2ONNX / TF-style flattening reshapes, a ``-1`` batch, explicit and
computed ("same") padding, selective-kernel attention, and the patterns that must stay frozen.

Same contract as :mod:`tests.graphs` (each builder returns ``(model, Expected)``); the inputs here have a dynamic
batch (``N``, or ``-1`` as Paddle2ONNX writes it) unless the motif is about a static one. :data:`EXPORT_MOTIFS` is
part of :data:`tests.graphs_refine.ALL_MOTIFS`, so every test that runs all motifs (analysis facts, pruned ==
masked, predicted == counted) runs these too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from tests.graphs import Expected, Net

DYNAMIC = ("N", 3, 8, 8)
PADDLE = (-1, 3, 8, 8)


def _ints(n: Net, *values: int) -> str:
    return n.const(np.array(values, np.int64))


def _batch_entry(n: Net, y: str) -> str:
    """``Shape(y)[0:1]``: the batch read at run time (how Paddle2ONNX and ``x.view(x.size(0), ...)`` write it)."""
    return n.op("Slice", [n.op("Shape", [y]), _ints(n, 0), _ints(n, 1), _ints(n, 0)])


def paddle_flatten_head() -> tuple[onnx.ModelProto, Expected]:
    """PP-OCR's classifier head: GAP -> Reshape(Concat(Shape(x)[0:1], [-1])) -> MatMul + Add -> Softmax, batch -1."""
    n = Net(60)
    y = n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 12)])
    pooled = n.op("GlobalAveragePool", [y])
    flat = n.op("Reshape", [pooled, n.op("Concat", [_batch_entry(n, pooled), _ints(n, -1)], axis=0)])
    logits = n.op("Add", [n.op("MatMul", [flat, n.rand(12, 4)]), n.rand(4, scale=0.1)])
    return n.model(n.op("Softmax", [logits], axis=1), shape=PADDLE), Expected(4, (8, 12))


def zero_minus_one_flatten() -> tuple[onnx.ModelProto, Expected]:
    """``Reshape(x, [0, -1])`` of a whole ``[N, 8, 4, 4]`` map into a dense head (block ``H*W = 16``)."""
    n = Net(61)
    y = n.op("MaxPool", [n.op("Relu", [n.conv("x", 3, 8)])], kernel_shape=[2, 2], strides=[2, 2])
    flat = n.op("Reshape", [y, _ints(n, 0, -1)])
    return n.model(n.gemm(n.op("Relu", [n.gemm(flat, 128, 16)]), 16, 10), shape=DYNAMIC), Expected(4, (8, 16))


def keras_flatten_head() -> tuple[onnx.ModelProto, Expected]:
    """TF / Keras: GAP -> ``Reshape(x, [-1, C])`` (the channel count written out: rewritten by surgery) -> Gemm."""
    n = Net(62)
    y = n.op("GlobalAveragePool", [n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 12)])])
    return n.model(n.gemm(n.op("Reshape", [y, _ints(n, -1, 12)]), 12, 10), shape=DYNAMIC), Expected(4, (8, 12))


def squeeze_reshape_activation() -> tuple[onnx.ModelProto, Expected]:
    """``[N, C, 1, 1] -> [N, C]`` (``Reshape(x, [0, 12])``) feeding an activation, then MatMul: the same channels."""
    n = Net(63)
    y = n.op("GlobalAveragePool", [n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 12)])])
    y = n.op("Sigmoid", [n.op("Reshape", [y, _ints(n, 0, 12)])])
    return n.model(n.op("MatMul", [y, n.rand(12, 10)]), shape=DYNAMIC), Expected(4, (8, 12))


def constant_batch_flatten() -> tuple[onnx.ModelProto, Expected]:
    """``Reshape(x, [2, -1])`` in a model whose batch is dynamic: right at batch 2 only (at batch 4 it would merge
    samples into the features), so the flatten is not proved and the group freezes (fail closed)."""
    n = Net(64)
    y = n.op("GlobalAveragePool", [n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 12)])])
    return n.model(n.gemm(n.op("Reshape", [y, _ints(n, 2, -1)]), 12, 10), shape=DYNAMIC), Expected(
        4, (8,), "reshape of the channel axis")


def explicit_pad() -> tuple[onnx.ModelProto, Expected]:
    """Paddle / TF write padding as a ``Pad`` before an unpadded conv (reflect mode here; batch -1)."""
    n = Net(65)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    y = n.op("Pad", [y, _ints(n, 0, 0, 1, 2, 0, 0, 1, 0)], mode="reflect")
    w = n.rand(12, 8, 3, 3, scale=0.2)
    y = n.op("Relu", [n.op("Conv", [y, w, n.rand(12, scale=0.1)], kernel_shape=[3, 3], strides=[2, 2])])
    return n.model(n.head(y, 12), shape=PADDLE), Expected(4, (8, 12))


def same_padding() -> tuple[onnx.ModelProto, Expected]:
    """TF "same" padding as timm's ``tf_`` models export it with dynamic sizes: the pads computed from ``Shape`` with
    arithmetic, in torch's order, then reordered to ONNX's (Concat with zeros, Reshape, reversed Slice, Transpose,
    Reshape, Cast); zero on the batch and channel axes, so the Pad is channel-wise."""
    n = Net(66)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    size = n.op("Gather", [n.op("Shape", [y]), _ints(n, 2, 3)], axis=0)  # [H, W]
    steps = n.op("Cast", [n.op("Ceil", [n.op("Div", [n.op("Cast", [size], to=onnx.TensorProto.FLOAT),
                                                     n.const(np.float32(2.0))])])], to=onnx.TensorProto.INT64)
    # max((ceil(x / s) - 1) * s + k - x, 0) with stride s = 2 and kernel k = 3
    total = n.op("Max", [n.op("Sub", [n.op("Add", [n.op("Mul", [n.op("Sub", [steps, _ints(n, 1)]), _ints(n, 2)]),
                                                   _ints(n, 3)]), size]), _ints(n, 0)])
    half = n.op("Div", [total, _ints(n, 2)])  # [pad_h // 2, pad_w // 2]
    begin_end = n.op("Concat", [n.op("Unsqueeze", [half, _ints(n, 1)]), n.op("Unsqueeze", [n.op("Sub", [
        total, half]), _ints(n, 1)])], axis=1)  # [[h0, h1], [w0, w1]]
    torch_order = n.op("Reshape", [n.op("Slice", [begin_end, _ints(n, -1), _ints(n, -(1 << 62)), _ints(n, 0),
                                                  _ints(n, -1)]), _ints(n, -1)])  # [w0, w1, h0, h1]
    pairs = n.op("Reshape", [n.op("Concat", [torch_order, _ints(n, 0, 0, 0, 0)], axis=0), _ints(n, -1, 2)])
    reordered = n.op("Slice", [pairs, _ints(n, -1), _ints(n, -(1 << 62)), _ints(n, 0), _ints(n, -1)])
    pads = n.op("Cast", [n.op("Reshape", [n.op("Transpose", [reordered], perm=[1, 0]), _ints(n, -1)])],
                to=onnx.TensorProto.INT64)
    y = n.op("Pad", [y, pads, n.const(np.float32(0.0))])
    w = n.rand(12, 8, 3, 3, scale=0.2)
    y = n.op("Relu", [n.op("Conv", [y, w, n.rand(12, scale=0.1)], kernel_shape=[3, 3], strides=[2, 2])])
    return n.model(n.head(y, 12), shape=DYNAMIC), Expected(4, (8, 12))


def pad_on_channels() -> tuple[onnx.ModelProto, Expected]:
    """A Pad that adds channels is not channel-wise: its input freezes."""
    n = Net(67)
    y = n.op("Pad", [n.op("Relu", [n.conv("x", 3, 8)]), _ints(n, 0, 2, 0, 0, 0, 0, 0, 0)])
    return n.model(n.head(n.conv(y, 10, 12), 12), shape=DYNAMIC), Expected(4, (12,), "unsupported consumer Pad")


def _selective_kernel(n: Net, x: str, c: int, *, view: str) -> str:
    """SK unit: two paths stacked on axis 1, summed, squeezed to attention logits ``[N, 2*C]`` viewed as
    ``[N, 2, C, 1, 1]``, softmax over the paths, weighted sum (``view``: ``const`` or ``shape`` target)."""
    paths = [n.op("Relu", [n.conv(x, c, c, k=3)]), n.op("Relu", [n.conv(x, c, c, k=5)])]
    stack = n.op("Concat", [n.op("Unsqueeze", [p, _ints(n, 1)]) for p in paths], axis=1)
    summed = n.op("ReduceSum", [stack, _ints(n, 1)], keepdims=0)
    logits = n.conv(n.op("Relu", [n.conv(n.op("GlobalAveragePool", [summed]), c, 4, k=1)]), 4, 2 * c, k=1)
    if view == "const":
        target = _ints(n, -1, 2, c, 1, 1)
    else:
        target = n.op("Concat", [_batch_entry(n, logits), _ints(n, 2, c, 1, 1)], axis=0)
    attn = n.op("Softmax", [n.op("Reshape", [logits, target])], axis=1)
    return n.op("ReduceSum", [n.op("Mul", [stack, attn]), _ints(n, 1)], keepdims=0)


def selective_kernel() -> tuple[onnx.ModelProto, Expected]:
    """SK-ResNet's selective-kernel attention (timm ``SelectiveKernel``), with a residual: every path, both blocks
    of the attention logits and the residual stream are one group of 8; the squeeze (4) is its own."""
    n = Net(68)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    y = n.op("Add", [_selective_kernel(n, s, 8, view="const"), s])
    return n.model(n.head(n.conv(y, 8, 12), 12), shape=DYNAMIC), Expected(5, (4, 8, 12))


def selective_kernel_by_shape() -> tuple[onnx.ModelProto, Expected]:
    """The same unit without the residual, the logits' view computed as ``Concat(Shape(x)[0:1], [2, C, 1, 1])``
    (surgery rewrites C in the Concat's constant piece)."""
    n = Net(69)
    y = _selective_kernel(n, n.op("Relu", [n.conv("x", 3, 8)]), 8, view="shape")
    return n.model(n.head(n.conv(y, 8, 12), 12), shape=DYNAMIC), Expected(6, (4, 8, 8, 12))


def branch_softmax_over_channels() -> tuple[onnx.ModelProto, Expected]:
    """Attention logits viewed as branches but softmaxed over the channel axis (2): not channel-wise, frozen."""
    n = Net(70)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    logits = n.conv(n.op("GlobalAveragePool", [s]), 8, 16, k=1)
    attn = n.op("Softmax", [n.op("Reshape", [logits, _ints(n, -1, 2, 8, 1, 1)])], axis=2)
    y = n.op("ReduceSum", [n.op("Mul", [n.op("Unsqueeze", [s, _ints(n, 1)]), attn]), _ints(n, 1)], keepdims=0)
    return n.model(n.head(n.conv(y, 8, 12), 12), shape=DYNAMIC), Expected(5, (12,), "unsupported consumer Softmax")


def split_attention() -> tuple[onnx.ModelProto, Expected]:
    """ResNeSt's split attention (radix 2): a group=2 conv's 16 outputs viewed as 2 branches of 8, summed; logits
    ``[N, 16, 1, 1]`` viewed as ``[N, 1, 2, 8]``, transposed to ``[N, 2, 1, 8]``, softmaxed over the branches,
    flattened to ``[N, 16]`` (batch read from another tensor's Shape), viewed as ``[N, 16, 1, 1]`` then ``[N, 2, 8, 1,
    1]``; weighted sum over the branches. Both halves of the grouped conv, both logit blocks and the output: one
    group of 8 (each conv group reads a whole copy of it)."""
    n = Net(73)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    paths = n.op("Relu", [n.conv(s, 8, 16, group=2)])
    stack = n.op("Reshape", [paths, _ints(n, 0, 2, 8, 8, 8)])
    gap = n.op("GlobalAveragePool", [n.op("ReduceSum", [stack, _ints(n, 1)], keepdims=0)])
    logits = n.conv(n.op("Relu", [n.conv(gap, 8, 4, k=1)]), 4, 16, k=1)
    view = n.op("Reshape", [logits, n.op("Concat", [_batch_entry(n, logits), _ints(n, 1, 2, -1)], axis=0)])
    attn = n.op("Softmax", [n.op("Transpose", [view], perm=[0, 2, 1, 3])], axis=1)
    flat = n.op("Reshape", [attn, n.op("Concat", [_batch_entry(n, logits), _ints(n, -1)], axis=0)])
    attn = n.op("Reshape", [n.op("Reshape", [flat, _ints(n, 0, -1, 1, 1)]), _ints(n, 0, 2, 8, 1, 1)])
    y = n.op("ReduceSum", [n.op("Mul", [stack, attn]), _ints(n, 1)], keepdims=0)
    return n.model(n.head(n.conv(y, 8, 12), 12), shape=DYNAMIC), Expected(6, (4, 8, 8, 12))


def channels_last_flatten() -> tuple[onnx.ModelProto, Expected]:
    """A TF / Keras head converted to ONNX: NCHW -> NHWC (Transpose), ``Reshape(x, [0, -1])``, MatMul: the MatMul's
    rows are ``H*W`` copies of the channels (position-major), sliced as such."""
    n = Net(74)
    y = n.op("MaxPool", [n.op("Relu", [n.conv("x", 3, 8)])], kernel_shape=[2, 2], strides=[2, 2])
    flat = n.op("Reshape", [n.op("Transpose", [y], perm=[0, 2, 3, 1]), _ints(n, 0, -1)])
    return n.model(n.op("MatMul", [flat, n.rand(128, 10, scale=0.1)]), shape=DYNAMIC), Expected(3, (8,))


def grouped_after_lrn() -> tuple[onnx.ModelProto, Expected]:
    """AlexNet / CaffeNet: LRN (mixes neighbouring channels: frozen) then a group=2 conv, whose output is still
    pruned in two equal blocks (its input is kept whole)."""
    n = Net(71)
    y = n.op("LRN", [n.op("Relu", [n.conv("x", 3, 8)])], size=3)
    y = n.op("Relu", [n.conv(y, 8, 8, group=2)])
    return n.model(n.head(n.conv(y, 8, 12), 12), shape=DYNAMIC), Expected(5, (8, 12))


def concat_with_untracked_part() -> tuple[onnx.ModelProto, Expected]:
    """A Concat of a conv branch and the output of an op analysis does not follow (LRN): that part is a frozen
    segment, the conv branch stays prunable."""
    n = Net(72)
    a = n.op("Relu", [n.conv("x", 3, 4)])
    b = n.op("LRN", [n.op("Relu", [n.conv("x", 3, 6)])], size=3)
    y = n.op("Relu", [n.conv(n.op("Concat", [a, b], axis=1), 10, 12)])
    return n.model(n.head(y, 12), shape=DYNAMIC), Expected(6, (4, 12), "input without channel layout at Concat")


EXPORT_MOTIFS: dict[str, Callable[[], tuple[onnx.ModelProto, Expected]]] = {
    f.__name__: f for f in (
        paddle_flatten_head, zero_minus_one_flatten, keras_flatten_head, squeeze_reshape_activation,
        constant_batch_flatten, explicit_pad, same_padding, pad_on_channels, selective_kernel,
        selective_kernel_by_shape, branch_softmax_over_channels, split_attention, channels_last_flatten,
        grouped_after_lrn, concat_with_untracked_part)
}
"""Motif name -> builder (production exports as shipped)."""


def paddle_style(model: onnx.ModelProto, *, dynamic_width: bool = False) -> onnx.ModelProto:
    """A model rewritten the way Paddle2ONNX writes its exports (a copy; the values it computes are unchanged):

    * the graph input's batch (and, with ``dynamic_width``, its last axis) and the outputs' batch are ``-1``; no
      ``value_info``;
    * every Conv with padding reads an explicit ``Pad`` (constant 0) and pads nothing itself;
    * ``Flatten(axis=1)`` is ``Reshape(x, Concat(Shape(x)[0:1], [-1]))``;
    * ``Gemm`` (``alpha = beta = 1``, no ``transA``, 1-D bias) is ``MatMul`` by the ``[K, N]`` weight, then ``Add``.
    """
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    del graph.value_info[:]
    for info in [*graph.input, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        for axis in ([0, len(dims) - 1] if dynamic_width and info in graph.input else [0])[:len(dims)]:
            dims[axis].Clear()
            dims[axis].dim_value = -1
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        name = node.name or node.output[0]
        if node.op_type == "Conv" and any(attrs.get("pads", ())) and attrs.get("auto_pad", b"NOTSET") == b"NOTSET":
            pads = list(attrs["pads"])
            half = len(pads) // 2
            padded = f"{name}__pad"
            nodes.append(onnx.helper.make_node("Pad", [node.input[0], const(f"{name}__pads", np.array(
                [0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64))], [padded], name=f"{name}_pad"))
            node.input[0] = padded
            next(a for a in node.attribute if a.name == "pads").ints[:] = [0] * len(pads)
        elif node.op_type == "Flatten" and attrs.get("axis", 1) == 1:
            x = node.input[0]
            shape = onnx.helper.make_node("Shape", [x], [f"{name}__shape"], name=f"{name}_shape")
            first = onnx.helper.make_node("Slice", [f"{name}__shape", const(f"{name}__0", np.array([0], np.int64)),
                                                    const(f"{name}__1", np.array([1], np.int64)),
                                                    const(f"{name}__axes", np.array([0], np.int64))],
                                          [f"{name}__batch"], name=f"{name}_batch")
            target = onnx.helper.make_node("Concat", [f"{name}__batch", const(f"{name}__m1", np.array([-1], np.int64))],
                                           [f"{name}__target"], name=f"{name}_target", axis=0)
            nodes.extend([shape, first, target])
            node = onnx.helper.make_node("Reshape", [x, f"{name}__target"], list(node.output), name=name)
        elif (node.op_type == "Gemm" and node.input[1] in inits and attrs.get("alpha", 1.0) == 1.0
              and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0) and len(node.input) > 2
              and node.input[2] in inits and len(inits[node.input[2]].dims) == 1):
            weight = numpy_helper.to_array(inits[node.input[1]])
            weight = weight.T if attrs.get("transB", 0) else weight
            product = f"{name}__matmul"
            nodes.append(onnx.helper.make_node("MatMul", [node.input[0], const(f"{name}__w", np.ascontiguousarray(
                weight))], [product], name=f"{name}_matmul"))
            node = onnx.helper.make_node("Add", [product, node.input[2]], list(node.output), name=name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out
