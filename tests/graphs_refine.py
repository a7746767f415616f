"""Motifs of production architectures: refinement instead of freezing, grouped convolutions, shape arithmetic.

Same contract as :mod:`tests.graphs` (each builder returns ``(model, Expected)``); :data:`ALL_MOTIFS` holds these and
the basic ones, for the tests that run every motif (analysis facts, pruned == masked, predicted == counted).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from tests.graphs import MOTIFS, Expected, Net
from tests.graphs_export import EXPORT_MOTIFS


def _ints(n: Net, *values: int) -> str:
    return n.const(np.array(values, np.int64))


def ghost_residual() -> tuple[onnx.ModelProto, Expected]:
    """GhostNet: primary conv + cheap depthwise of it, Concat, Slice to 6, residual Add with the 6-channel stem."""
    n = Net(30)
    stem = n.op("Relu", [n.conv("x", 3, 6)])
    primary = n.op("Relu", [n.conv(stem, 6, 4, k=1)])
    cheap = n.op("Relu", [n.conv(primary, 4, 4, group=4)])
    ghost = n.op("Concat", [primary, cheap], axis=1)
    part = n.op("Slice", [ghost, _ints(n, 0), _ints(n, 6), _ints(n, 1)])
    y = n.op("Add", [part, stem])
    # stem[0:2] ~ primary[0:2] ~ stem[4:6] (via the cheap copy), stem[2:4] ~ primary[2:4]
    return n.model(n.head(n.conv(y, 6, 16), 16)), Expected(5, (2, 2, 16))


def mixed_depthwise() -> tuple[onnx.ModelProto, Expected]:
    """MixNet: Split [3, 5] into a 3x3 and a 5x5 depthwise conv, Concat, residual Add with the split input."""
    n = Net(31)
    s = n.op("Relu", [n.conv("x", 3, 8, k=1)])
    n.op("Split", [s, _ints(n, 3, 5)], n_out=2, axis=1)
    a, b = n.outputs()
    y = n.op("Concat", [n.conv(a, 3, 3, k=3, group=3), n.conv(b, 5, 5, k=5, group=5)], axis=1)
    y = n.op("Add", [y, s])
    return n.model(n.head(n.conv(y, 8, 12, k=1), 12)), Expected(5, (3, 5, 12))


def c2f_block() -> tuple[onnx.ModelProto, Expected]:
    """YOLO C2f: cv1, equal Split (no sizes), a residual bottleneck on the second half, Concat of all, cv2."""
    n = Net(32)
    cv1 = n.op("Relu", [n.conv("x", 3, 8, k=1)])
    n.op("Split", [cv1], n_out=2, axis=1)
    a, b = n.outputs()
    m = n.op("Add", [b, n.conv(n.op("Relu", [n.conv(b, 4, 4)]), 4, 4)])
    y = n.op("Relu", [n.conv(n.op("Concat", [a, b, m], axis=1), 12, 8, k=1)])
    return n.model(n.head(y, 8)), Expected(6, (4, 4, 4, 8))


def se_over_concat() -> tuple[onnx.ModelProto, Expected]:
    """An SE gate over a Concat of two convs: the gate's space is refined into the two branches."""
    n = Net(33)
    y = n.op("Concat", [n.op("Relu", [n.conv("x", 3, 4)]), n.op("Relu", [n.conv("x", 3, 4)])], axis=1)
    g = n.op("Sigmoid", [n.conv(n.op("Relu", [n.conv(n.op("GlobalAveragePool", [y]), 8, 2, k=1)]), 2, 8, k=1)])
    y = n.op("Mul", [y, g])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(6, (2, 4, 4, 16))


def spatial_attention() -> tuple[onnx.ModelProto, Expected]:
    """A one-channel attention map broadcast over the channels it gates (only read; its own group is frozen)."""
    n = Net(34)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    y = n.op("Mul", [y, n.op("Sigmoid", [n.conv(y, 8, 1)])])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(5, (8, 16), "broadcast over channels")


def resize_by_shape() -> tuple[onnx.ModelProto, Expected]:
    """GhostNetV2: a gate computed at half resolution, resized with sizes = Shape(gate)[0:2] + [8, 8]."""
    n = Net(35)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    g = n.op("Sigmoid", [n.conv(n.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2]), 8, 8, k=1)])
    sizes = n.op("Concat", [n.op("Slice", [n.op("Shape", [g]), _ints(n, 0), _ints(n, 2), _ints(n, 0)]),
                            _ints(n, 8, 8)], axis=0)
    y = n.op("Mul", [y, n.op("Resize", [g, "", "", sizes], mode="nearest")])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (8, 16))


def spatial_reshape() -> tuple[onnx.ModelProto, Expected]:
    """[N,C,H,W] -> [N,C,H*W] (channel entry 0), Softmax over positions, back to [N,C,H,W] (constant C, rewritten)."""
    n = Net(36)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    y = n.op("Softmax", [n.op("Reshape", [y, _ints(n, 0, 0, 64)])], axis=2)
    y = n.op("Reshape", [y, _ints(n, 1, 8, 8, 8)])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(4, (8, 16))


def channel_count_arithmetic() -> tuple[onnx.ModelProto, Expected]:
    """Reshape to [N, C/2, -1] with C read through Shape: the channel count is computed with, so it freezes."""
    n = Net(37)
    y = n.op("Relu", [n.conv("x", 3, 8)])
    dims = n.op("Shape", [y])
    half = n.op("Div", [n.op("Gather", [dims, _ints(n, 1)], axis=0), _ints(n, 2)])
    target = n.op("Concat", [n.op("Gather", [dims, _ints(n, 0)], axis=0), half, _ints(n, -1)], axis=0)
    z = n.op("Reshape", [y, target])
    z = n.op("Reshape", [z, _ints(n, 1, 8, 8, 8)])
    return n.model(n.head(n.conv(z, 8, 16), 16)), Expected(4, (16,), "channel count of")


def grouped_se_block() -> tuple[onnx.ModelProto, Expected]:
    """RegNetY / ResNeXt: 1x1, grouped 3x3 (4 groups), SE gate, 1x1, residual Add with the stem."""
    n = Net(38)
    s = n.op("Relu", [n.conv("x", 3, 8)])
    y = n.op("Relu", [n.conv(n.op("Relu", [n.conv(s, 8, 16, k=1)]), 16, 16, group=4)])
    g = n.op("Sigmoid", [n.conv(n.op("Relu", [n.conv(n.op("GlobalAveragePool", [y]), 16, 4, k=1)]), 4, 16, k=1)])
    y = n.op("Add", [n.conv(n.op("Mul", [y, g]), 16, 8, k=1), s])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(7, (4, 8, 16, 16, 16))


def grouped_input_of_two_groups() -> tuple[onnx.ModelProto, Expected]:
    """A group=2 conv reading a Concat of two convs: equal counts across two groups are not expressible: frozen."""
    n = Net(39)
    y = n.op("Concat", [n.conv("x", 3, 4), n.conv("x", 3, 4)], axis=1)
    y = n.op("Relu", [n.conv(y, 8, 8, group=2)])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(6, (8, 16), "reads channels of several groups")


def depthwise_multiplier() -> tuple[onnx.ModelProto, Expected]:
    """Conv with group = C_in and 2 outputs per input: input frozen, output in 4 blocks of 2."""
    n = Net(40)
    y = n.op("Relu", [n.conv(n.op("Relu", [n.conv("x", 3, 4)]), 4, 8, group=4)])
    return n.model(n.head(n.conv(y, 8, 16), 16)), Expected(5, (8, 16), "one channel per conv group")


def _gelu(n: Net, y: str) -> str:
    """GELU as torch's legacy exporter writes it: x * (erf(x / sqrt 2) + 1) * 0.5."""
    half = n.const(np.array(0.5, np.float32))
    erf = n.op("Erf", [n.op("Div", [y, n.const(np.array(np.sqrt(2.0), np.float32))])])
    return n.op("Mul", [n.op("Mul", [y, n.op("Add", [erf, n.const(np.array(1.0, np.float32))])]), half])


def token_mlp() -> tuple[onnx.ModelProto, Expected]:
    """A transformer block's MLP on tokens: patch conv -> tokens [1, 16, 8] -> LayerNorm -> MatMul [8, 24] + bias ->
    GELU -> MatMul [24, 8] + bias -> residual Add -> mean over tokens -> Gemm. The 24 hidden features (last axis)
    are a prunable group; the token stream itself (a LayerNorm normalises over it) is not."""
    n = Net(40)
    patches = n.op("Conv", ["x", n.rand(8, 3, 2, 2, scale=0.3), n.rand(8, scale=0.1)], kernel_shape=[2, 2],
                   strides=[2, 2])
    tokens = n.op("Transpose", [n.op("Reshape", [patches, _ints(n, 1, 8, 16)])], perm=[0, 2, 1])
    normed = n.op("LayerNormalization", [tokens, n.rand(8), n.rand(8, scale=0.1)], axis=-1)
    hidden = _gelu(n, n.op("Add", [n.op("MatMul", [normed, n.rand(8, 24, scale=0.35)]), n.rand(24, scale=0.1)]))
    out = n.op("Add", [n.op("MatMul", [hidden, n.rand(24, 8, scale=0.2)]), n.rand(8, scale=0.1)])
    pooled = n.op("ReduceMean", [n.op("Add", [tokens, out])], axes=[1], keepdims=0)
    return n.model(n.gemm(pooled, 8, 10)), Expected(4, (24,))  # the patch conv's tokens and the MLP's output: one


def channels_last_mlp() -> tuple[onnx.ModelProto, Expected]:
    """A ConvNeXt block with Linear layers: depthwise conv -> channels last (Transpose) -> MatMul [8, 32] + bias ->
    GELU -> per-channel scale -> MatMul [32, 8] -> back to channels first -> residual Add -> head. The 32 hidden
    features (last axis of a 4-D tensor) are a prunable group."""
    n = Net(41)
    stem = n.op("Relu", [n.conv("x", 3, 8)])
    mixed = n.op("Transpose", [n.conv(stem, 8, 8, group=8)], perm=[0, 2, 3, 1])
    hidden = _gelu(n, n.op("Add", [n.op("MatMul", [mixed, n.rand(8, 32, scale=0.35)]), n.rand(32, scale=0.1)]))
    hidden = n.op("Mul", [hidden, n.rand(32)])
    back = n.op("Transpose", [n.op("MatMul", [hidden, n.rand(32, 8, scale=0.2)])], perm=[0, 3, 1, 2])
    return n.model(n.head(n.op("Add", [stem, back]), 8)), Expected(5, (32,))


REFINE_MOTIFS: dict[str, Callable[[], tuple[onnx.ModelProto, Expected]]] = {
    f.__name__: f for f in (
        ghost_residual, mixed_depthwise, c2f_block, se_over_concat, spatial_attention, resize_by_shape,
        spatial_reshape, channel_count_arithmetic, grouped_se_block, grouped_input_of_two_groups,
        depthwise_multiplier, token_mlp, channels_last_mlp)
}
"""Motif name -> builder (production-architecture motifs)."""

ALL_MOTIFS = {**MOTIFS, **REFINE_MOTIFS, **EXPORT_MOTIFS}
"""Every motif: the basic ones of :mod:`tests.graphs`, these, and the exports of :mod:`tests.graphs_export`."""
