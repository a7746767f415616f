"""Motif graphs for channel analysis and surgery tests: one builder per channel rule.

Each builder returns ``(model, Expected)``. Models are built directly in canonical form (initializers, explicit
biases, unique names; BatchNormalization kept as an op where the motif is about it), with seeded random weights and
input ``x`` of shape ``[1, 3, 8, 8]``. ``Expected`` lists what analysis must find: the number of groups (the graph
input's group and the classifier's output group included, both frozen), the sorted sizes of the prunable groups, and
a substring of one freeze reason when the motif is about freezing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_SHAPE = (1, 3, 8, 8)
OPSET = 17


@dataclass(frozen=True)
class Expected:
    """Facts a motif's analysis must show."""

    groups: int
    prunable_sizes: tuple[int, ...]
    reason: str | None = None


class Net:
    """A tiny ONNX graph builder with seeded weights (test-only)."""

    def __init__(self, seed: int = 0) -> None:
        """Start a graph with input ``x`` of shape ``INPUT_SHAPE``."""
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        """Add an initializer, return its name."""
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def rand(self, *shape: int, scale: float = 1.0) -> str:
        """Add a random float32 initializer."""
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), "w")

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> str:
        """Add a node; return its first output (``name:i`` outputs are ``<node>_out<i>``)."""
        name = self._name(op_type.lower())
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def outputs(self) -> list[str]:
        """All outputs of the last node."""
        return list(self.nodes[-1].output)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        """Conv with 'same' padding."""
        w = self.rand(cout, cin // group, k, k, scale=1.0 / np.sqrt(cin // group * k * k))
        ins = [x, w, self.rand(cout, scale=0.1)] if bias else [x, w]
        return self.op("Conv", ins, pads=[k // 2] * 4, group=group, kernel_shape=[k, k])

    def bn(self, x: str, c: int) -> str:
        """BatchNormalization with random statistics."""
        scale, shift = self.rand(c), self.rand(c)
        mean = self.rand(c, scale=0.1)
        var = self.const((self.rng.uniform(0.5, 2, c)).astype(np.float32), "var")
        return self.op("BatchNormalization", [x, scale, shift, mean, var])

    def gemm(self, x: str, k: int, n: int) -> str:
        """Gemm with transB=1 and a bias."""
        return self.op("Gemm", [x, self.rand(n, k, scale=1 / np.sqrt(k)), self.rand(n, scale=0.1)], transB=1)

    def head(self, x: str, c: int, classes: int = 10) -> str:
        """GlobalAveragePool -> Flatten -> Gemm to ``classes`` logits."""
        return self.gemm(self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1), c, classes)

    def model(self, *outputs: str, shape: tuple[int | str, ...] = INPUT_SHAPE) -> onnx.ModelProto:
        """Finish the model with these graph outputs (``shape``: the input's dims; a string or -1 is dynamic)."""
        graph = helper.make_graph(
            self.nodes, "motif", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model)


def conv_bn_relu() -> tuple[onnx.ModelProto, Expected]:
    """Conv -> BN (kept as an op) -> Relu, twice."""
    n = Net(1)
    y = n.op("Relu", [n.bn(n.conv("x", 3, 8), 8)])
    y = n.op("Relu", [n.bn(n.conv(y, 8, 12), 12)])
    return n.model(n.head(y, 12)), Expected(4, (8, 12))


def per_channel_affine() -> tuple[onnx.ModelProto, Expected]:
    """Mul by [1,C,1,1], Add [C,1,1], Div by a scalar: constants are sliced with the channels."""
    n = Net(2)
    y = n.op("Mul", [n.conv("x", 3, 8), n.rand(1, 8, 1, 1)])
    y = n.op("Div", [n.op("Add", [y, n.rand(8, 1, 1)]), n.const(np.float32(2.0))])
    return n.model(n.head(n.conv(n.op("Relu", [y]), 8, 12), 12)), Expected(4, (8, 12))


def residual() -> tuple[onnx.ModelProto, Expected]:
    """Stem and the block's last conv are one group (residual Add)."""
    n = Net(3)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    r = n.conv(n.op("Relu", [n.conv(s, 8, 6)]), 6, 8)
    y = n.op("Relu", [n.op("Add", [r, s])])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(5, (6, 8, 16))


def concat() -> tuple[onnx.ModelProto, Expected]:
    """Inception-like: Concat of two convs and a pooled stem (offsets 0, 4, 10)."""
    n = Net(4)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    b1 = n.op("Relu", [n.conv(s, 8, 4, k=1)])
    b2 = n.op("Relu", [n.conv(s, 8, 6)])
    b3 = n.op("MaxPool", [s], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = n.op("Concat", [b1, b2, b3], axis=1)
    return n.model(n.head(n.conv(y, 18, 12), 12)), Expected(6, (4, 6, 8, 12))


def depthwise_separable() -> tuple[onnx.ModelProto, Expected]:
    """Pointwise -> depthwise -> pointwise: the depthwise conv passes its space through."""
    n = Net(5)
    y = n.op("Relu", [n.conv("x", 3, 8, k=1)])
    y = n.op("Relu", [n.conv(y, 8, 8, group=8)])
    return n.model(n.head(n.conv(y, 8, 16, k=1), 16)), Expected(4, (8, 16))


def se_block() -> tuple[onnx.ModelProto, Expected]:
    """Squeeze-excitation (ReduceMean -> conv -> relu -> conv -> sigmoid -> Mul): the gate unions with the stem."""
    n = Net(6)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    g = n.op("ReduceMean", [s], axes=[2, 3], keepdims=1)
    g = n.op("Sigmoid", [n.conv(n.op("Relu", [n.conv(g, 8, 4, k=1)]), 4, 8, k=1)])
    y = n.op("Mul", [s, g])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(5, (4, 8, 16))


def flatten_gemm() -> tuple[onnx.ModelProto, Expected]:
    """Flatten of [1,8,8,8] into Gemm: consumer rows in blocks of H*W = 64."""
    n = Net(7)
    y = n.op("Flatten", [n.op("Relu", [n.conv("x", 3, 8)])], axis=1)
    y = n.op("Relu", [n.gemm(y, 512, 16)])
    return n.model(n.gemm(y, 16, 10)), Expected(4, (8, 16))


def reshape_gemm() -> tuple[onnx.ModelProto, Expected]:
    """Reshape to [-1, 512] into Gemm: the shape constant is recomputed."""
    n = Net(8)
    y = n.op("Reshape", [n.op("Relu", [n.conv("x", 3, 8)]), n.const(np.array([-1, 512], np.int64))])
    return n.model(n.gemm(y, 512, 10)), Expected(3, (8,))


def matmul_head() -> tuple[onnx.ModelProto, Expected]:
    """GAP -> Flatten -> MatMul + Add bias -> Relu -> MatMul."""
    n = Net(9)
    y = n.op("Flatten", [n.op("GlobalAveragePool", [n.op("Relu", [n.conv("x", 3, 8)])])], axis=1)
    y = n.op("Relu", [n.op("Add", [n.op("MatMul", [y, n.rand(8, 16)]), n.rand(16)])])
    return n.model(n.op("MatMul", [y, n.rand(16, 10)])), Expected(4, (8, 16))


def token_matmul() -> tuple[onnx.ModelProto, Expected]:
    """Conv -> Relu -> Conv -> Relu -> tokens [1, 64, 8] (Reshape, Transpose) -> MatMul [8, 6] -> Relu -> mean over
    tokens: a transformer-style Linear over the last axis of a 3-D input, downstream of a prunable group."""
    n = Net(13)
    y = n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 8)])
    y = n.op("Transpose", [n.op("Reshape", [y, n.const(np.array([1, 8, 64], np.int64))])], perm=[0, 2, 1])
    y = n.op("Relu", [n.op("MatMul", [y, n.rand(8, 6, scale=0.5)])])
    return n.model(n.op("ReduceMean", [y], axes=[1], keepdims=0)), Expected(3, (8,), "reshape of the channel axis")


def grouped_conv() -> tuple[onnx.ModelProto, Expected]:
    """A group=2 conv: its input and output groups come in 2 equal blocks (same kept count in each)."""
    n = Net(10)
    y = n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 8)]), 8, 8, group=2)])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(5, (8, 8, 16))


def channel_shuffle() -> tuple[onnx.ModelProto, Expected]:
    """Reshape/Transpose/Reshape channel shuffle freezes the group (its blocks would interleave after pruning)."""
    n = Net(11)
    y = n.op("Reshape", [n.conv("x", 3, 8), n.const(np.array([1, 2, 4, 8, 8], np.int64))])
    y = n.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = n.op("Reshape", [y, n.const(np.array([1, 8, 8, 8], np.int64))])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (16,), "channel shuffle at Reshape")


def softmax_over_channels() -> tuple[onnx.ModelProto, Expected]:
    """Softmax over axis 1 freezes the group."""
    n = Net(12)
    y = n.op("Softmax", [n.conv("x", 3, 8)], axis=1)
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (16,), "unsupported consumer Softmax")


def split_on_boundary() -> tuple[onnx.ModelProto, Expected]:
    """Concat(4, 6) then Split [4, 6]: allowed, the two branch convs union through the Add."""
    n = Net(13)
    y = n.op("Relu", [n.op("Concat", [n.conv("x", 3, 4), n.conv("x", 3, 6)], axis=1)])
    n.op("Split", [y, n.const(np.array([4, 6], np.int64))], n_out=2, axis=1)
    a, b = n.outputs()
    y = n.op("Add", [n.conv(a, 4, 8), n.conv(b, 6, 8)])
    return n.model(n.head(y, 8)), Expected(5, (4, 6, 8))


def split_equal() -> tuple[onnx.ModelProto, Expected]:
    """Split into two equal halves without sizes: surgery must make the (now unequal) sizes explicit."""
    n = Net(22)
    n.op("Split", [n.op("Concat", [n.conv("x", 3, 4), n.conv("x", 3, 4)], axis=1)], n_out=2, axis=1)
    a, b = n.outputs()
    y = n.op("Add", [n.conv(a, 4, 8), n.conv(b, 4, 8)])
    return n.model(n.head(y, 8)), Expected(5, (4, 4, 8))


def split_off_boundary() -> tuple[onnx.ModelProto, Expected]:
    """Split [3, 5] of one 8-channel group: refined into two groups of 3 and 5, pruned independently."""
    n = Net(14)
    n.op("Split", [n.op("Relu", [n.conv("x", 3, 8)]), n.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    a, b = n.outputs()
    y = n.op("Add", [n.conv(a, 3, 8), n.conv(b, 5, 8)])
    return n.model(n.head(y, 8)), Expected(5, (3, 5, 8))


def slice_channels() -> tuple[onnx.ModelProto, Expected]:
    """Slice [4, huge) on axis 1 of Concat(4, 6) feeds one conv, the whole Concat another."""
    n = Net(15)
    cat = n.op("Concat", [n.conv("x", 3, 4), n.conv("x", 3, 6)], axis=1)
    ends = np.array([1 << 62], np.int64)
    part = n.op("Slice", [cat, n.const(np.array([4], np.int64)), n.const(ends), n.const(np.array([1], np.int64))])
    y = n.op("Add", [n.conv(part, 6, 8), n.conv(cat, 10, 8)])
    return n.model(n.head(y, 8)), Expected(5, (4, 6, 8))


def pad_resize_pool() -> tuple[onnx.ModelProto, Expected]:
    """Spatial Pad, MaxPool, Resize (scales 1,1,2,2), AveragePool are channel-wise."""
    n = Net(16)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    y = n.op("Pad", [y, n.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    y = n.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = n.op("Resize", [y, "", n.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = n.op("AveragePool", [y], kernel_shape=[3, 3])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (8, 16))


def conv_transpose() -> tuple[onnx.ModelProto, Expected]:
    """ConvTranspose (W is [C_in, C_out, k, k]) as source and consumer."""
    n = Net(17)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    w = n.rand(8, 6, 2, 2, scale=0.3)
    y = n.op("Relu", [n.op("ConvTranspose", [y, w, n.rand(6, scale=0.1)], kernel_shape=[2, 2], strides=[2, 2])])
    return n.model(n.head(n.conv(y, 6, 16), 16)), Expected(5, (6, 8, 16))


def prelu() -> tuple[onnx.ModelProto, Expected]:
    """PRelu with a per-channel slope [C, 1, 1]."""
    n = Net(18)
    y = n.op("PRelu", [n.conv("x", 3, 8), n.rand(8, 1, 1, scale=0.3)])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (8, 16))


def hardswish_swish() -> tuple[onnx.ModelProto, Expected]:
    """HardSwish, and Swish written as x * Sigmoid(x)."""
    n = Net(19)
    y = n.conv(n.op("HardSwish", [n.conv("x", 3, 8)]), 8, 12)
    y = n.op("Mul", [y, n.op("Sigmoid", [y])])
    return n.model(n.head(n.conv(y, 12, 16), 16)), Expected(5, (8, 12, 16))


def graph_output_of_conv() -> tuple[onnx.ModelProto, Expected]:
    """A conv feature map that is also a graph output is frozen."""
    n = Net(20)
    feat = n.op("Relu", [n.conv("x", 3, 8)])
    return n.model(n.head(n.conv(feat, 8, 16), 16), feat), Expected(4, (16,), "reaches graph output")


def unknown_op() -> tuple[onnx.ModelProto, Expected]:
    """LRN (not in CHANNEL_RULES) freezes what it reads."""
    n = Net(21)
    y = n.op("LRN", [n.op("Relu", [n.conv("x", 3, 8)])], size=3)
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (16,), "unsupported consumer LRN")


MOTIFS: dict[str, Callable[[], tuple[onnx.ModelProto, Expected]]] = {
    f.__name__: f for f in (
        conv_bn_relu, per_channel_affine, residual, concat, depthwise_separable, se_block, flatten_gemm,
        reshape_gemm, matmul_head, grouped_conv, channel_shuffle, softmax_over_channels, split_on_boundary,
        split_equal, split_off_boundary, slice_channels, pad_resize_pool, conv_transpose, prelu, hardswish_swish,
        graph_output_of_conv, unknown_op)
}
"""Motif name -> builder."""


def tiny_classifier(path: str, *, in_channels: int, widths: tuple[int, int], classes: int, spatial: int | None = 8,
                    w1_scale: float = 1.0, seed: int = 0) -> str:
    """Write ``input -> Conv -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm -> logits`` (opset 17) to ``path``.

    The smallest real classifier with two prunable groups and a frozen logits group; used by CLI and calibration
    tests. ``w1_scale`` scales the first weight (huge values make activations overflow to inf); ``spatial=None``
    makes the input's height and width symbolic (``H``, ``W``).
    """
    rng = np.random.default_rng(seed)
    c1, c2 = widths

    def init(name: str, *shape: int, scale: float = 1.0) -> onnx.TensorProto:
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    inits = [init("w1", c1, in_channels, 3, 3, scale=w1_scale), init("b1", c1), init("w2", c2, c1, 3, 3),
             init("b2", c2), init("w3", classes, c2), init("b3", classes)]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["N", in_channels, spatial or "H", spatial or "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path
