"""Classic IR-3 model topologies shipped with the onnx wheel (``onnx/backend/test/data/light``).

These nine models (AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512)
have IR version 3 (every initializer is a graph input) and constant weights made by ConstantOfShape. For each:
canonicalize gives the same outputs as the original (onnxruntime, seeded inputs) and an IR version >= 4; then, with
seeded random Conv/Gemm weights (He scale, so the outputs are not constant), analysis + a seeded random valid plan
give the same outputs as the mask oracle, and the pruned MACs/params equal the cost model's prediction. ShuffleNet
(v1) has no prunable group: its grouped 1x1 convs (group=4) freeze every group around them (by design in v1).

All nine take about a minute on two cores (``zoo``); SqueezeNet alone also runs in the default suite (``slow``) as
the IR-3 regression test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.cost import count
from graph_ops.io import load_model
from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from tests.oracles import assert_same_outputs, random_feeds, random_valid_plan

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))
ALL_FROZEN = {"shufflenet": ("grouped Conv", "depthwise Conv", "graph input", "unsupported consumer",
                             "reshape of the channel axis", "channel shuffle at")}  # channel shuffles: frozen
DEFAULT = "squeezenet"  # the fast one, run by default


def _random_weights(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A copy whose Conv/Gemm weights and biases are seeded random (weights He-scaled by their fan-in)."""
    slots = {n.input[k]: k for n in model.graph.node if n.op_type in ("Conv", "Gemm") for k in (1, 2)
             if k < len(n.input)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name not in slots:
            continue
        shape = tuple(init.dims)
        fan_in = int(np.prod(shape[1:])) if slots[init.name] == 1 and len(shape) > 1 else 1
        values = rng.standard_normal(shape) * (np.sqrt(2.0 / fan_in) if slots[init.name] == 1 else 0.1)
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
    return out


@pytest.mark.parametrize("ir_version", [3, 8], ids=["ir3", "ir8"])
def test_initializer_inputs_become_constants(ir_version: int) -> None:
    """An initializer listed as a graph input (mandatory in IR 3) is a constant after canonicalize; IR >= 4."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "ir",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = ir_version
    canonical = canonicalize(model)
    assert canonical.ir_version == max(ir_version, 4)
    assert [i.name for i in canonical.graph.input] == ["x"]
    assert_same_outputs(model, canonical, random_feeds(model, rng), rtol=1e-6)


def test_light_models_found() -> None:
    assert len(MODELS) == 9, MODELS


def _check_light(name: str) -> None:
    original = load_model(LIGHT / f"light_{name}.onnx")
    assert original.ir_version < 4
    rng = np.random.default_rng(0)
    feeds = random_feeds(original, rng, batch=1)
    canonical = canonicalize(original)
    assert canonical.ir_version >= 4
    assert_same_outputs(original, canonical, feeds, rtol=1e-4)
    model = _random_weights(canonical, rng)
    index = analyze(model)
    plan = random_valid_plan(index, rng)
    if name in ALL_FROZEN:
        assert not plan and all(any(r in g.frozen for r in ALL_FROZEN[name]) for g in index.groups)
        return
    assert plan, "no prunable group"
    pruned = apply_plan(model, index, plan)
    assert_same_outputs(zero_channels(model, index, plan), pruned, feeds, rtol=1e-4)
    report = count(pruned)
    assert index.predict({gid: len(kept) for gid, kept in plan.items()}) == (report.macs, report.params)


@pytest.mark.slow
def test_light_ir3_default() -> None:
    _check_light(DEFAULT)


@pytest.mark.zoo
@pytest.mark.parametrize("name", [m for m in MODELS if m != DEFAULT])
def test_light_canonicalize_and_prune(name: str) -> None:
    _check_light(name)
