"""Edge-GPU artifacts: TensorRT-ready INT8 (symmetric signed Q/DQ where TensorRT fuses), the FP16 file, and the
report's artifacts with the board commands; on the shipped MNIST CNN with real data (onnxruntime CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from pipeline.cli import main
from pipeline.data.named import open_dataset
from pipeline.deployment.fp16 import convert_fp16
from pipeline.deployment.quantize import (
    BACKEND_RECIPES,
    INT8_RECIPES,
    TENSORRT_INPUT_OPS,
    Int8Quantizer,
    qdq_zero_points,
    tensorrt_placement,
)
from pipeline.evaluation.evaluate import evaluate
from pipeline.model.prepare import prepare
from pipeline.prune.demo import demo_model_path

pytestmark = pytest.mark.slow  # real quantization, conversion and evaluation of the demo CNN


@pytest.fixture(scope="module")
def fp32() -> onnx.ModelProto:
    return prepare(demo_model_path()).model


@pytest.fixture(scope="module")
def test_data() -> object:
    return open_dataset("mnist", split="test", limit=500)


def _source(model: onnx.ModelProto, tensor: str) -> list[str]:
    """The op types walked back from a tensor through QuantizeLinear / DequantizeLinear ('init' at an initializer)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    chain = []
    while tensor in producer and producer[tensor].op_type in ("QuantizeLinear", "DequantizeLinear"):
        chain.append(producer[tensor].op_type)
        tensor = producer[tensor].input[0]
    return [*chain, "init" if tensor in {i.name for i in model.graph.initializer} else "act"]


def test_every_backend_has_a_recipe_and_cpu_keeps_the_x86_one() -> None:
    assert set(BACKEND_RECIPES) == {"ort-cpu", "ort-cuda", "ort-trt", "tensorrt"}
    assert BACKEND_RECIPES["ort-cpu"] == "x86" and BACKEND_RECIPES["tensorrt"] == BACKEND_RECIPES["ort-trt"] == \
        "tensorrt"
    assert set(BACKEND_RECIPES.values()) <= set(INT8_RECIPES)


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])  # entropy: its own test below
def test_tensorrt_int8_is_symmetric_signed_and_placed_where_tensorrt_fuses(fp32: onnx.ModelProto, test_data: object,
                                                                           calibration: str) -> None:
    quantizer = Int8Quantizer(fp32, open_dataset("mnist", split="train", limit=256), recipe="tensorrt",
                              calibration=calibration)
    try:
        int8 = quantizer.quantize()
    finally:
        quantizer.close()
    zero_points = qdq_zero_points(int8)
    assert zero_points and all(dtype == TensorProto.INT8 and values == [0] for _, dtype, values in zero_points)
    placed = set(tensorrt_placement(fp32))
    nodes = {n.name: n for n in int8.graph.node}
    assert "/block/Add" in placed
    add = nodes["/block/Add"]  # the convolution's side stays fp32 (TensorRT fuses the Add into it), the residual not
    assert [_source(int8, t)[0] for t in add.input] == ["act", "DequantizeLinear"]
    for name in placed - {"/block/Add"}:
        node = nodes[name]
        assert all(_source(int8, t)[:2] == ["DequantizeLinear", "QuantizeLinear"] for t in node.input[:2]), name
        if node.op_type in TENSORRT_INPUT_OPS:  # the weight: fp32 behind a Q/DQ pair, per output channel
            assert _source(int8, node.input[1])[-1] == "init"
            dq = next(n for n in int8.graph.node if n.output[0] == node.input[1])
            assert any(a.name == "axis" for a in dq.attribute) or node.op_type == "Gemm"
        if len(node.input) > 2 and node.op_type in TENSORRT_INPUT_OPS:
            assert _source(int8, node.input[2]) == ["init"]  # bias stays fp32
    consumers = {}
    for n in int8.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    for q in (n for n in int8.graph.node if n.op_type == "QuantizeLinear" and _source(int8, n.input[0]) == ["act"]):
        # an activation is quantized only where a placed node reads it (not on Relu / MaxPool / Flatten inputs)
        readers = {c.name for dq in consumers[q.output[0]] for c in consumers[dq.output[0]]}
        assert readers <= placed, (q.name, readers)
    report = evaluate(int8, test_data, reference=fp32)
    original = evaluate(fp32, test_data)
    assert report.top1 >= original.top1 - 0.01 and report.agreement >= 0.97


def test_residual_add_of_two_convolutions_keeps_one_quantized_input(tmp_path: Path) -> None:
    """A projection shortcut: TensorRT fuses the Add into the later convolution, which reads the other one's output
    in int8."""
    rng = np.random.default_rng(0)
    model = _two_convolutions(tmp_path, rng)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32), y=np.zeros(32, np.int64))
    quantizer = Int8Quantizer(model, open_dataset(str(tmp_path / "d.npz")), samples=32, recipe="tensorrt")
    try:
        int8 = quantizer.quantize()
    finally:
        quantizer.close()
    onnx.checker.check_model(int8, full_check=True)
    add = next(n for n in int8.graph.node if n.op_type == "Add")
    assert [_source(int8, t)[0] for t in add.input] == ["DequantizeLinear", "act"]  # convB is the later one
    assert all(d == TensorProto.INT8 and v == [0] for _, d, v in qdq_zero_points(int8))


def test_x86_recipe_keeps_uint8_asymmetric_activations(fp32: onnx.ModelProto) -> None:
    quantizer = Int8Quantizer(fp32, open_dataset("mnist", split="train", limit=64), samples=64)
    try:
        int8 = quantizer.quantize()
    finally:
        quantizer.close()
    types = {dtype for _, dtype, _ in qdq_zero_points(int8)}
    assert TensorProto.UINT8 in types and any(v != [0] for _, d, v in qdq_zero_points(int8) if d == TensorProto.UINT8)


def test_excluding_every_placed_node_leaves_the_fp32_model(fp32: onnx.ModelProto) -> None:
    quantizer = Int8Quantizer(fp32, open_dataset("mnist", split="train", limit=64), samples=64, recipe="tensorrt")
    try:
        same = quantizer.quantize(exclude=tensorrt_placement(fp32))
        one = quantizer.quantize(only=[tensorrt_placement(fp32)[0]])
    finally:
        quantizer.close()
    assert same.SerializeToString() == fp32.SerializeToString()
    assert 0 < sum(n.op_type == "QuantizeLinear" for n in one.graph.node) <= 2  # its input and its weight


def test_fp16_conversion_keeps_io_types_blocks_ops_and_stays_close(fp32: onnx.ModelProto, test_data: object) -> None:
    half = convert_fp16(fp32)
    assert {i.data_type for i in half.graph.initializer} == {TensorProto.FLOAT16}
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    report = evaluate(half, test_data, reference=fp32)
    assert report.agreement >= 0.99 and report.outputs["logits"]["max_abs_diff"] < 0.05
    blocked = convert_fp16(fp32, op_block_list=["Gemm"])
    gemm_weights = {n.input[1] for n in blocked.graph.node if n.op_type == "Gemm"}
    assert {i.data_type for i in blocked.graph.initializer if i.name in gemm_weights} == {TensorProto.FLOAT}
    raw = convert_fp16(fp32, keep_io_types=False)
    assert raw.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_prune_for_tensorrt_writes_int8_and_fp16_artifacts_without_timing(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(demo_model_path(), model)
    out = tmp_path / "pruned.onnx"
    code = main(["-q", "prune", str(model), "--data", "mnist", "--limit", "256", "--method", "l2", "--recover",
                 "none", "--target-macs", "0.8", "--eval-data", "mnist", "--backend", "tensorrt", "--quantize",
                 "int8", "--int8-calibration", "percentile", "--precision", "fp16", "-o", str(out)])
    assert code == 0
    report = json.loads(Path(f"{out}.report.json").read_text())
    section = report["evaluation"]["int8"]
    assert section["latency"] is None and "not timed here" in section["latency_note"]
    assert section["quantization"]["recipe"] == "tensorrt" and section["quantization"]["calibration"] == "percentile"
    rows = section["models"]
    assert rows["pruned_int8"]["top1"] >= rows["pruned_fp32"]["top1"] - 0.01
    int8 = onnx.load(str(tmp_path / "pruned.int8.onnx"))
    assert all(d == TensorProto.INT8 and v == [0] for _, d, v in qdq_zero_points(int8))
    fp16 = report["evaluation"]["fp16"]
    assert fp16["top1_drop_points"] <= 1.0 and fp16["max_abs_diff"] is not None
    half = onnx.load(str(tmp_path / "pruned.fp16.onnx"))
    assert TensorProto.FLOAT16 in {i.data_type for i in half.graph.initializer}
    artifacts = report["artifacts"]
    assert set(artifacts) == {"fp32", "int8", "fp16"}
    assert artifacts["int8"]["command"].startswith("trtexec --onnx=") and "--int8 --fp16" in artifacts["int8"][
        "command"]
    assert "--fp16" in artifacts["fp16"]["command"] and "--shapes=input:1x1x28x28" in artifacts["fp32"]["command"]
    assert np.isfinite(report["pruned"]["params"])


def test_int8_calibration_without_quantize_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", str(demo_model_path()), "--data", "mnist", "--target-macs", "0.8", "--int8-calibration",
                 "entropy", "-o", str(tmp_path / "p.onnx")])
    assert code == 1 and "add --quantize int8" in capsys.readouterr().err


def _two_convolutions(tmp_path: Path, rng: np.random.Generator) -> onnx.ModelProto:
    """Add(ConvA(x), ConvB(x)): a residual Add whose two inputs come from weighted layers."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("wa", (8, 3, 3, 3)), ("wb", (8, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="convA", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="convB"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_entropy_calibration_clips_outliers_and_is_computed_once(tmp_path: Path) -> None:
    """onnxruntime's quantize_static alone gives MinMax ranges for Entropy (its default bin counts leave one
    threshold); ours searches thresholds as TensorRT does, so a heavy-tailed input gets a smaller scale."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    model = _two_convolutions(tmp_path, rng)  # cut to its first convolution: onnxruntime's search is slow per tensor
    model.graph.node.pop()
    model.graph.node.pop()
    model.graph.initializer.pop()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8, 8, 8]))
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    x.reshape(-1)[rng.choice(x.size, 20, replace=False)] *= 25  # a few outliers
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(64, np.int64))

    def input_scale(calibration: str) -> float:
        quantizer = Int8Quantizer(model, open_dataset(str(tmp_path / "d.npz")), samples=64, recipe="tensorrt",
                                  calibration=calibration)
        try:
            quantized = quantizer.quantize()
            quantizer.quantize(exclude=["convA"])
            assert quantizer.calibrations == 1
        finally:
            quantizer.close()
        return float(numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == "x_scale")))

    minmax, entropy = input_scale("minmax"), input_scale("entropy")
    assert minmax == pytest.approx(float(np.abs(x).max()) / 127, rel=1e-5)
    assert entropy < 0.5 * minmax
