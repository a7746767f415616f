"""MACs/params counter: hand-computed layers and agreement with torch module counts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.cost import CostReport, count


def _model(node: onnx.NodeProto, inits: dict[str, tuple[int, ...]], in_shape: list) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(np.ones(shape, np.float32), name) for name, shape in inits.items()]
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    # Conv 4->8, 3x3, pad 1 on 6x6: 8*4*9 MACs per output pixel, 36 pixels; W + bias params.
    "conv": (helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1]), {"W": (8, 4, 3, 3), "B": (8,)},
             ["N", 4, 6, 6], 8 * 4 * 9 * 36, 8 * 4 * 9 + 8),
    # grouped conv, group 2, stride 2, no padding on 7x7 -> 3x3 output
    "conv-group2-stride2": (helper.make_node("Conv", ["x", "W"], ["y"], group=2, strides=[2, 2]), {"W": (8, 2, 3, 3)},
                            [1, 4, 7, 7], 8 * 2 * 9 * 9, 8 * 2 * 9),
    "depthwise": (helper.make_node("Conv", ["x", "W", "B"], ["y"], group=4, pads=[1, 1, 1, 1]),
                  {"W": (4, 1, 3, 3), "B": (4,)}, [1, 4, 5, 5], 4 * 9 * 25, 36 + 4),
    # ConvTranspose: C_in * (C_out/group) * k*k * input pixels
    "convtranspose": (helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2, strides=[2, 2]),
                      {"W": (4, 3, 2, 2)}, [1, 4, 6, 6], 4 * 3 * 4 * 36, 48),
    "gemm-transB": (helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1), {"W": (10, 64), "B": (10,)},
                    ["N", 64], 64 * 10, 650),
    "gemm": (helper.make_node("Gemm", ["x", "W"], ["y"]), {"W": (64, 10)}, [3, 64], 640, 640),
    "matmul-3d": (helper.make_node("MatMul", ["x", "W"], ["y"]), {"W": (16, 5)}, [1, 7, 16], 7 * 5 * 16, 80),
    "batchnorm": (helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"]),
                  {"g": (6,), "b": (6,), "m": (6,), "v": (6,)}, [1, 6, 4, 4], 0, 12),
    "prelu": (helper.make_node("PRelu", ["x", "s"], ["y"]), {"s": (6, 1, 1)}, [1, 6, 4, 4], 0, 6),
    "relu": (helper.make_node("Relu", ["x"], ["y"]), {}, [1, 6, 4, 4], 0, 0),
}


@pytest.mark.parametrize(("node", "inits", "shape", "macs", "params"), list(CASES.values()), ids=list(CASES))
def test_layer_counts_match_hand_computation(node, inits, shape, macs, params) -> None:
    report = count(_model(node, inits, shape))
    assert (report.macs, report.params) == (macs, params)
    assert report.unresolved == ()


def test_breakdown_names_nodes_and_sums_to_totals() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c1")
    report = count(_model(node, {"W": (2, 3, 1, 1)}, [1, 3, 4, 4]))
    assert dict(report.by_node) == {"c1": ("Conv", 6 * 16, 6)}
    assert isinstance(report, CostReport)
    with pytest.raises(TypeError):
        report.by_node["c2"] = ("Conv", 0, 0)  # read-only mapping


def test_dynamic_spatial_dims_are_reported_unresolved() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c1")
    report = count(_model(node, {"W": (2, 3, 1, 1)}, [1, 3, "H", "W"]))
    assert report.macs == 0 and report.params == 6
    assert report.unresolved == ("c1",)


@pytest.mark.slow
def test_counts_match_torch_modules(small_cnn_onnx) -> None:
    import torch
    from torch import nn

    from graph_ops.io import load_model
    from tests.models import small_cnn, small_cnn_example

    module = small_cnn()
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    macs: list[int] = []

    def hook(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        pixels = int(np.prod(output.shape[2:])) if isinstance(layer, nn.Conv2d) else 1
        macs.append(layer.weight.numel() * pixels)

    for layer in layers:
        layer.register_forward_hook(hook)
    with torch.no_grad():
        module(small_cnn_example())
    # canonical form: BN folded into the conv before it, every conv/linear has a bias of C_out
    params = sum(layer.weight.numel() for layer in layers)
    params += sum(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features for layer in layers)
    report = count(load_model(small_cnn_onnx("dynamo")))
    assert report.macs == sum(macs)
    assert report.params == params
