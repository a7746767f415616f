"""ONNX -> torch -> ONNX: onnx2torch reproduces the graphs, parameters map back to the same initializers."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.model.torch_bridge import parity, to_torch, torch_settings, write_back
from pipeline.prune.demo import demo_model_path
from tests.graphs import INPUT_SHAPE, MOTIFS
from tests.oracles import random_feeds, run_ort

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None,
                                reason="needs the [torch] extra (onnx2torch is not installed)")


def _structure(model: onnx.ModelProto) -> tuple:
    """Everything but initializer values: nodes, graph inputs/outputs, initializer names, dtypes and shapes."""
    graph = model.graph
    return (tuple(n.SerializeToString(deterministic=True) for n in graph.node),
            tuple(i.SerializeToString(deterministic=True) for i in [*graph.input, *graph.output]),
            tuple((t.name, t.data_type, tuple(t.dims)) for t in graph.initializer), tuple(model.opset_import))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-12))


@pytest.mark.parametrize("name", sorted(MOTIFS))
def test_round_trip_reproduces_every_motif(name: str) -> None:
    model, _ = MOTIFS[name]()
    graph = to_torch(model)
    feeds = random_feeds(model, np.random.default_rng(0), batch=INPUT_SHAPE[0])
    assert parity(model, graph, feeds) <= 1e-5  # torch computes what onnxruntime computes
    back = write_back(model, graph)  # no training: the written model must be the input, value for value
    assert _structure(back) == _structure(model)
    assert [t.SerializeToString() for t in back.graph.initializer] == \
           [t.SerializeToString() for t in model.graph.initializer]
    assert graph.links and not graph.frozen  # every Conv/Gemm/MatMul weight of a motif is trainable


def test_round_trip_reproduces_the_demo_model() -> None:
    model = onnx.load(str(demo_model_path()))
    graph = to_torch(model)
    feeds = {graph.inputs[0]: np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)}
    assert parity(model, graph, feeds) <= 1e-5
    assert len(graph.links) == 2 * sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    out = run_ort(write_back(model, graph), feeds)[0]
    assert _relative(out, run_ort(model, feeds)[0]) <= 1e-5


def _gemm_model(trans_b: int, shared: bool = False) -> onnx.ModelProto:
    """x[N,6] -> Gemm(W, transB) -> Relu -> MatMul(V) (-> MatMul(V) again when ``shared``)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 6) if trans_b else (6, 5)).astype(np.float32)
    v = rng.standard_normal((5, 5)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="gemm", transB=trans_b),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "v"], ["y" if not shared else "m"], name="mm")]
    if shared:
        nodes.append(helper.make_node("MatMul", ["m", "v"], ["y"], name="mm2"))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"),
             numpy_helper.from_array(v, "v")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB=0", "transB=1"])
def test_changed_parameters_are_written_to_their_own_initializers(trans_b: int) -> None:
    model = _gemm_model(trans_b)
    graph = to_torch(model)
    assert {link.initializer for link in graph.links} == {"w", "b", "v"}
    assert any(link.transpose for link in graph.links) == (trans_b == 0)  # Linear holds W^T when transB=0
    with torch_settings(0, 1) as torch, torch.no_grad():
        for param in graph.parameters():
            param.add_(torch.randn(param.shape))
    back = write_back(model, graph)
    feeds = {"x": np.random.default_rng(4).standard_normal((3, 6)).astype(np.float32)}
    assert parity(back, graph, feeds) <= 1e-5  # the written graph computes what the changed module computes
    assert _structure(back) == _structure(model)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert all(not np.array_equal(numpy_helper.to_array(t), before[t.name]) for t in back.graph.initializer)


def test_a_weight_shared_by_two_nodes_is_frozen_not_guessed() -> None:
    model = _gemm_model(1, shared=True)
    graph = to_torch(model)
    frozen = dict(graph.frozen)
    assert {link.initializer for link in graph.links} == {"w", "b"}
    assert len(frozen) == 2 and all("shared weight" in reason for reason in frozen.values())


def test_torch_settings_restore_the_global_state() -> None:
    with torch_settings(0, 1) as torch:
        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        first = torch.rand(3)
    with torch_settings(0, 1) as torch:
        again = torch.rand(3)
    assert threads == 1 and deterministic
    assert torch.equal(first, again)  # seeded
    assert not torch.are_deterministic_algorithms_enabled()
