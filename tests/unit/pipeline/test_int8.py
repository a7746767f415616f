"""INT8 after pruning: onnxruntime static QDQ quantization, mixed precision, ``prune --quantize int8``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.cost import count
from graph_ops.proto import declared_shapes
from pipeline.cli import main
from pipeline.data.named import open_dataset
from pipeline.deployment.mixed_precision import (
    fewest_passing,
    head,
    magnitude_sensitivity,
    search_mixed_precision,
)
from pipeline.deployment.quantize import Int8Quantizer, weight_layers
from pipeline.errors import UserInputError
from pipeline.evaluation.evaluate import evaluate
from pipeline.model.prepare import prepare
from pipeline.prune.demo import demo_model_path

pytestmark = pytest.mark.slow  # real quantization and evaluation of the demo CNN (a few seconds)


@pytest.fixture(scope="module")
def quantizer() -> Int8Quantizer:
    model = prepare(demo_model_path()).model
    q = Int8Quantizer(model, open_dataset("mnist", split="train", limit=128), samples=128)
    yield q
    q.close()


@pytest.fixture(scope="module")
def test_data() -> object:
    return open_dataset("mnist", split="test", limit=300)


def _weight_source(model: onnx.ModelProto, node_name: str) -> str:
    """The op type producing a node's weight input ('initializer' when it is one)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return producers.get(node.input[1], "initializer")


def test_int8_model_is_qdq_calibrated_once_and_agrees_with_fp32(quantizer: Int8Quantizer, test_data: object) -> None:
    before = quantizer.model.SerializeToString()
    int8 = quantizer.quantize()
    again = quantizer.quantize(exclude=weight_layers(quantizer.model)[:1])
    assert quantizer.model.SerializeToString() == before  # the fp32 model is not touched
    assert quantizer.calibrations == 1  # the activation ranges were reused
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    first = weight_layers(quantizer.model)[0]
    assert _weight_source(int8, first) == "DequantizeLinear"
    assert _weight_source(again, first) == "initializer"  # excluded: fp32 weights
    report = evaluate(int8, test_data, reference=quantizer.model)
    assert report.agreement >= 0.95


def test_cost_of_a_qdq_model_is_the_cost_of_its_fp32_model(quantizer: Int8Quantizer) -> None:
    int8 = quantizer.quantize()
    fp32 = count(quantizer.model)
    for cost in (count(int8), count(int8, declared_shapes(int8))):
        assert (cost.macs, cost.params, cost.unresolved) == (fp32.macs, fp32.params, ())


def test_magnitude_sensitivity_is_the_relative_weight_error(quantizer: Int8Quantizer) -> None:
    layers = weight_layers(quantizer.model)
    sens = magnitude_sensitivity(quantizer, layers)
    assert set(sens) == set(layers)
    assert all(0 < v < 0.02 for v in sens.values())  # per-channel int8: well under 2 % of the weight norm


@pytest.mark.parametrize(("first_pass", "expected"), [(0, 0), (1, 1), (3, 3), (5, 5), (8, 8)])
def test_fewest_passing_finds_the_first_passing_count(first_pass: int, expected: int) -> None:
    calls: list[int] = []

    def passes(k: int) -> bool:
        calls.append(k)
        return k >= first_pass

    assert fewest_passing(8, passes) == expected
    assert len(calls) <= 1 + 2 * 4  # doubling then bisection, not a linear scan


def test_mixed_precision_search_records_what_it_tried(quantizer: Int8Quantizer, test_data: object) -> None:
    def top1(model: onnx.ModelProto) -> float:
        return float(evaluate(model, test_data).top1)

    result = search_mixed_precision(quantizer, top1, 100.0, ranking="magnitude")
    assert result.met and result.fp32_layers == () and result.tried[0]["fp32_layers"] == 0
    with pytest.raises(UserInputError, match="ranking"):
        search_mixed_precision(quantizer, top1, 1.0, ranking="hessian")


def test_di_sensitivity_ranks_every_layer(quantizer: Int8Quantizer) -> None:
    from pipeline.deployment.mixed_precision import di_sensitivity

    small = Int8Quantizer(quantizer.model, head(quantizer.data, 64), samples=64)
    try:
        sens = di_sensitivity(small, weight_layers(quantizer.model)[-2:], samples=64)
    finally:
        small.close()
    assert len(sens) == 2 and all(np.isfinite(v) and v < 1 for v in sens.values())


def test_cli_prune_quantize_int8_writes_the_int8_model_and_the_four_way_table(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(demo_model_path(), model)
    out = tmp_path / "pruned.onnx"
    code = main(["-q", "prune", str(model), "--data", "mnist", "--limit", "128", "--method", "l2", "--recover", "none",
                 "--target-macs", "0.6", "--eval-data", "mnist", "--quantize", "int8", "--latency-threads", "1",
                 "--max-top1-drop", "100", "-o", str(out)])
    assert code == 0
    int8 = onnx.load(str(tmp_path / "pruned.int8.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in int8.graph.node}
    section = json.loads(Path(f"{out}.report.json").read_text())["evaluation"]["int8"]
    assert list(section["models"]) == ["original_fp32", "original_int8", "pruned_fp32", "pruned_int8"]
    assert section["models"]["original_fp32"]["speedup"] == 1.0
    assert all(row["top1"] is not None and row["latency_ms"] > 0 for row in section["models"].values())
    assert section["mixed_precision"]["fp32_layers"] == []  # 100 points: uniform int8 meets it
