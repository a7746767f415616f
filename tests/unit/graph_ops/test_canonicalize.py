"""Canonicalization passes: numerics before vs after (ORT, seeded inputs) and the canonical-form guarantees."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops import CANONICALIZE, PASSES
from graph_ops.canonicalize import canonicalize
from graph_ops.errors import PassError
from graph_ops.io import load_model, verify_model
from graph_ops.passes import PassResult, run_passes

RTOL, ATOL = 1e-4, 1e-5
SEED = np.random.default_rng(1234)


def _arr(*shape: int, positive: bool = False) -> np.ndarray:
    values = SEED.standard_normal(shape).astype(np.float32)
    return np.abs(values) + 0.5 if positive else values


def _init(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def _const_node(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values)))


def _model(nodes, inits, in_shape=(1, 4, 6, 6), out="y", opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ([out] if isinstance(out, str) else out)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _bn(prefix: str, c: int) -> tuple[list[onnx.TensorProto], list[str]]:
    names = [f"{prefix}_{k}" for k in ("g", "b", "m", "v")]
    values = [_arr(c), _arr(c), _arr(c), _arr(c, positive=True)]
    return [_init(n, v) for n, v in zip(names, values, strict=True)], names


def _run(ort_session, model: onnx.ModelProto, feed: np.ndarray) -> list[np.ndarray]:
    session = ort_session(model)
    return session.run(None, {session.get_inputs()[0].name: feed})


def _check_same(ort_session, model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    feed = rng.standard_normal(shape).astype(np.float32)
    out = canonicalize(model)
    verify_model(out)
    for a, b in zip(_run(ort_session, model, feed), _run(ort_session, out, feed), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    return out


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def conv_bn(bias: bool) -> onnx.ModelProto:
    inits, bn = _bn("bn", 8)
    inits.append(_init("W", _arr(8, 4, 3, 3)))
    conv_in = ["x", "W"] + (["B"] if bias else [])
    if bias:
        inits.append(_init("B", _arr(8)))
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", *bn], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["y"])]
    return _model(nodes, inits)


def gemm_bn(trans_b: int) -> onnx.ModelProto:
    inits, bn = _bn("bn", 5)
    w = _arr(5, 12) if trans_b else _arr(12, 5)
    inits += [_init("W", w), _init("C", _arr(5))]
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "C"], ["g"], transB=trans_b, alpha=0.7, beta=0.5),
             helper.make_node("BatchNormalization", ["g", *bn], ["y"])]
    return _model(nodes, inits, in_shape=(3, 3, 2, 2))


def conv_transpose_bn() -> onnx.ModelProto:
    inits, bn = _bn("bn", 6)
    inits.append(_init("W", _arr(4, 3, 2, 2)))
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=2, strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", *bn], ["y"])]
    return _model(nodes, inits)


@pytest.mark.parametrize("model", [conv_bn(True), conv_bn(False), gemm_bn(1), gemm_bn(0), conv_transpose_bn()],
                         ids=["conv-bias", "conv-nobias", "gemm-transB1", "gemm-transB0", "convtranspose-group2"])
def test_batchnorm_is_fused_exactly(model, ort_session, rng) -> None:
    out = _check_same(ort_session, model, rng)
    assert "BatchNormalization" not in _ops(out)


def bn_after_relu() -> onnx.ModelProto:
    inits, bn = _bn("bn", 8)
    inits.append(_init("W", _arr(8, 4, 1, 1)))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("BatchNormalization", ["r", *bn], ["y"])]
    return _model(nodes, inits)


def bn_conv_output_shared() -> onnx.ModelProto:
    inits, bn = _bn("bn", 8)
    inits.append(_init("W", _arr(8, 4, 1, 1)))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("BatchNormalization", ["c", *bn], ["n"]),
             helper.make_node("Add", ["n", "c"], ["y"])]
    return _model(nodes, inits)


@pytest.mark.parametrize("model", [bn_after_relu(), bn_conv_output_shared()], ids=["after-relu", "conv-out-shared"])
def test_unfusable_batchnorm_is_kept(model, ort_session, rng) -> None:
    out = _check_same(ort_session, model, rng)
    assert _ops(out)["BatchNormalization"] == 1
    assert all(len(n.input) == 3 for n in out.graph.node if n.op_type == "Conv")  # bias still materialized


def test_constant_node_weights_become_initializers(ort_session, rng) -> None:
    nodes = [_const_node("W", _arr(6, 4, 3, 3)), _const_node("B", _arr(6)), _const_node("k", np.float32(2.0)),
             helper.make_node("Mul", ["W", "k"], ["W2"]),
             helper.make_node("Conv", ["x", "W2", "B"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    out = _check_same(ort_session, _model(nodes, []), rng)
    assert _ops(out) == Counter({"Conv": 1, "Relu": 1})
    inits = {i.name for i in out.graph.initializer}
    assert set(out.graph.node[0].input[1:]) <= inits


def test_static_shape_chain_folds_to_constant_reshape(ort_session, rng) -> None:
    inits = [_init("W", _arr(4, 4, 1, 1)), _init("i0", np.array(0, np.int64)), _init("ax", np.array([0], np.int64)),
             _init("m1", np.array([-1], np.int64)), _init("G", _arr(144, 3))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0), helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]),
             helper.make_node("Concat", ["nu", "m1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["c", "shape"], ["f"]), helper.make_node("MatMul", ["f", "G"], ["y"])]
    out = _check_same(ort_session, _model(nodes, inits), rng)
    assert _ops(out) == Counter({"Conv": 1, "Reshape": 1, "MatMul": 1})
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    shape = next(i for i in out.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(shape).tolist() == [1, -1]


def test_identity_and_dropout_are_removed_keeping_output_names(ort_session, rng) -> None:
    inits = [_init("W", _arr(4, 4, 1, 1)), _init("ratio", np.array(0.5, np.float32))]
    nodes = [helper.make_node("Identity", ["x"], ["x1"]), helper.make_node("Conv", ["x1", "W"], ["c"]),
             helper.make_node("Dropout", ["c", "ratio"], ["d"]), helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Identity", ["r"], ["y"]), helper.make_node("Identity", ["r"], ["i2"]),
             helper.make_node("Sigmoid", ["i2"], ["z"])]
    out = _check_same(ort_session, _model(nodes, inits, out=["y", "z"]), rng)
    assert _ops(out) == Counter({"Conv": 1, "Relu": 1, "Sigmoid": 1})
    assert next(n for n in out.graph.node if n.op_type == "Relu").output[0] == "y"


def test_shared_weights_and_operands_get_private_copies(ort_session, rng) -> None:
    inits = [_init("W", _arr(4, 4, 1, 1)), _init("B", _arr(4)), _init("S", _arr(1, 4, 1, 1)),
             _init("k", np.array(3.0, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["a"]), helper.make_node("Conv", ["a", "W", "B"], ["b"]),
             helper.make_node("Mul", ["a", "S"], ["a2"]), helper.make_node("Mul", ["b", "S"], ["b2"]),
             helper.make_node("Add", ["a2", "k"], ["a3"]), helper.make_node("Add", ["b2", "k"], ["b3"]),
             helper.make_node("Add", ["a3", "b3"], ["y"])]
    out = _check_same(ort_session, _model(nodes, inits), rng)
    uses = Counter(name for n in out.graph.node if n.op_type in ("Conv", "Mul") for name in n.input[1:])
    assert all(count == 1 for count in uses.values()), uses
    assert len(uses) == 6
    scalar_uses = Counter(n.input[1] for n in out.graph.node if n.op_type == "Add" and n.input[1] == "k")
    assert scalar_uses["k"] == 2  # scalars may stay shared


def test_gemm_bias_is_normalised(ort_session, rng) -> None:
    inits = [_init("W", _arr(6, 36)), _init("C", _arr(1, 6))]
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "C"], ["y"], transB=1, beta=0.25)]
    out = _check_same(ort_session, _model(nodes, inits, in_shape=(2, 4, 3, 3)), rng)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    bias = next(i for i in out.graph.initializer if i.name == gemm.input[2])
    assert list(bias.dims) == [6]
    assert helper.get_node_attr_value(gemm, "beta") == 1.0


def test_nodes_get_unique_names_and_existing_unique_names_stay(ort_session, rng) -> None:
    inits = [_init("W", _arr(4, 4, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="stem"), helper.make_node("Relu", ["c"], ["r"], name="dup"),
             helper.make_node("Sigmoid", ["r"], ["s"], name="dup"), helper.make_node("Relu", ["s"], ["y"])]
    model = _model(nodes, inits)
    out = canonicalize(model)
    for node in model.graph.node:
        node.name = ""  # onnxruntime rejects the duplicate names of the original
    feed = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(ort_session, out, feed)[0], _run(ort_session, model, feed)[0], rtol=RTOL, atol=ATOL)
    names = [n.name for n in out.graph.node]
    assert len(set(names)) == len(names) and all(names)
    assert "stem" in names and names.count("dup") <= 1


def test_input_model_is_not_modified_and_canonicalize_is_idempotent() -> None:
    model = conv_bn(False)
    before = model.SerializeToString()
    once = canonicalize(model)
    twice = canonicalize(once)
    assert model.SerializeToString() == before
    assert _ops(once) == _ops(twice)
    assert sorted(i.name for i in once.graph.initializer) == sorted(i.name for i in twice.graph.initializer)


@pytest.mark.parametrize("opset", [13, 17, 18], ids=lambda o: f"opset{o}")
def test_opset_and_ir_version_are_kept(opset) -> None:
    model = conv_bn(True)
    model.opset_import[0].version = opset
    out = canonicalize(model)
    assert out.opset_import[0].version == opset and out.ir_version == model.ir_version


def test_external_data_model(tmp_path: Path, ort_session, rng) -> None:
    model = conv_bn(True)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    out = _check_same(ort_session, load_model(path), rng)
    assert "BatchNormalization" not in _ops(out)


def test_failing_pass_is_reported_with_its_predecessors() -> None:
    def explode(graph, /) -> PassResult:
        raise ValueError("boom")

    registry = {**PASSES, "explode": explode}
    with pytest.raises(PassError, match=r"pass 'explode' failed \(after: fold_constants\).*boom"):
        run_passes(conv_bn(True), ["fold_constants", "explode"], registry=registry)
    with pytest.raises(PassError, match="unknown pass"):
        run_passes(conv_bn(True), ["no_such_pass"], registry=PASSES)


def test_registry_lists_the_canonical_order() -> None:
    assert set(CANONICALIZE) <= set(PASSES)
    assert CANONICALIZE.index("name_nodes") < CANONICALIZE.index("materialize_bias")


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_export_of_small_cnn(dynamo: bool, tmp_path: Path, ort_session) -> None:
    import torch

    from pipeline.model.export import export_raw
    from tests.models import small_cnn

    model = small_cnn(bias=False)
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    export_raw(model, example, tmp_path / "raw.onnx", dynamo=dynamo)
    raw = load_model(tmp_path / "raw.onnx")
    out = _check_same(ort_session, raw, np.random.default_rng(0))
    assert not set(_ops(out)) & {"Constant", "Identity", "BatchNormalization"}
    with torch.no_grad():
        expected = model(example).numpy()
    np.testing.assert_allclose(_run(ort_session, out, example.numpy())[0], expected, rtol=1e-4, atol=1e-5)
    for node in out.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert len(node.input) == 3 and node.input[2]
