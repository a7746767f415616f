"""Tiny dense-output models (opset 17, random seeded weights) for location-aware calibration tests.

* :func:`seg_net`: ``input (N, 1, 16, 16) -> Conv(4) -> Relu (r1) -> Conv(8, stride 2) -> Relu (r2, 8 x 8) -> Conv
  1x1 (K) -> scores (N, K, 8, 8)`` (``K = 1``: a Sigmoid probability map, as a DBNet text detector).
* :func:`ctc_net`: ``input (N, 1, 8, 32) -> Conv(4) -> Relu (r1) -> Conv(8, stride 2) -> Relu (r2, 4 x 16) ->
  AveragePool(4 x 1) -> Conv 1x1 (K) -> Reshape (N, K, 16) -> Transpose -> Softmax -> probs (N, 16, K)``: a CTC head
  of 16 steps.
* :func:`yolo_net`: ``input (N, 3, 32, 32) -> Conv(8, stride 8) -> Relu (r1, 4 x 4) -> Conv(8, stride 2) -> Relu
  (r2, 2 x 2)``; per scale a 1x1 head of ``4 + K`` channels, Sigmoid, scaled boxes, reshaped and concatenated to
  ``output0 (N, 4 + K, 20)`` (strides 8 and 16 of a 32 x 32 input: 16 + 4 anchors), the ultralytics v8/11 layout.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(path: str, nodes: list, inputs: list, outputs: list, inits: list) -> str:
    graph = helper.make_graph(nodes, "dense", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _init(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def _trunk(rng: np.random.Generator, c_in: int, *, first_stride: int = 1) -> tuple[list, list]:
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1],
                         strides=[first_stride, first_stride]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
    ]
    inits = [_init(rng, "w1", 4 if first_stride == 1 else 8, c_in, 3, 3), _init(rng, "b1", 4 if first_stride == 1
                                                                                 else 8, scale=0.2),
             _init(rng, "w2", 8, 4 if first_stride == 1 else 8, 3, 3), _init(rng, "b2", 8, scale=0.2)]
    return nodes, inits


def seg_net(path: str, *, classes: int = 3, seed: int = 0) -> str:
    """See the module docstring."""
    rng = np.random.default_rng(seed)
    nodes, inits = _trunk(rng, 1)
    nodes.append(helper.make_node("Conv", ["r2", "w3", "b3"], ["logits" if classes == 1 else "scores"], name="head"))
    if classes == 1:
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid"))
    inits += [_init(rng, "w3", classes, 8, 1, 1, scale=1.0), _init(rng, "b3", classes, scale=0.1)]
    return _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
                 [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes, 8, 8])], inits)


def ctc_net(path: str, *, classes: int = 5, seed: int = 0) -> str:
    """See the module docstring."""
    rng = np.random.default_rng(seed)
    nodes, inits = _trunk(rng, 1)
    nodes += [
        helper.make_node("AveragePool", ["r2"], ["col"], name="pool_h", kernel_shape=[4, 1]),
        helper.make_node("Conv", ["col", "w3", "b3"], ["logits"], name="classifier"),
        helper.make_node("Reshape", ["logits", "flat_shape"], ["flat"], name="flatten_h"),
        helper.make_node("Transpose", ["flat"], ["steps"], name="to_steps", perm=[0, 2, 1]),
        helper.make_node("Softmax", ["steps"], ["probs"], name="softmax", axis=2),
    ]
    inits += [_init(rng, "w3", classes, 8, 1, 1, scale=1.5), _init(rng, "b3", classes, scale=0.3),
              numpy_helper.from_array(np.asarray([0, classes, 16], np.int64), "flat_shape")]
    return _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 32])],
                 [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 16, classes])], inits)


def yolo_net(path: str, *, classes: int = 2, seed: int = 0) -> str:
    """See the module docstring."""
    rng = np.random.default_rng(seed)
    nodes, inits = _trunk(rng, 3, first_stride=8)
    heads = []
    for level, (source, cells, stride) in enumerate((("r1", 16, 8), ("r2", 4, 16))):
        p = f"h{level}"
        nodes += [
            helper.make_node("Conv", [source, f"{p}_w", f"{p}_b"], [f"{p}_raw"], name=f"{p}_conv"),
            helper.make_node("Sigmoid", [f"{p}_raw"], [f"{p}_sig"], name=f"{p}_sigmoid"),
            helper.make_node("Mul", [f"{p}_sig", f"{p}_scale"], [f"{p}_scaled"], name=f"{p}_mul"),
            helper.make_node("Reshape", [f"{p}_scaled", f"{p}_shape"], [f"{p}_flat"], name=f"{p}_reshape"),
        ]
        scale = np.ones((1, 4 + classes, 1, 1), np.float32)
        scale[0, :4] = 32.0
        scale[0, 2:4] = 4.0 * stride  # widths and heights up to 4 cells
        inits += [_init(rng, f"{p}_w", 4 + classes, 8, 1, 1, scale=1.0), _init(rng, f"{p}_b", 4 + classes, scale=0.5),
                  numpy_helper.from_array(scale, f"{p}_scale"),
                  numpy_helper.from_array(np.asarray([0, 4 + classes, cells], np.int64), f"{p}_shape")]
        heads.append(f"{p}_flat")
    nodes.append(helper.make_node("Concat", heads, ["output0"], name="concat", axis=2))
    return _save(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                 [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + classes, 20])], inits)
