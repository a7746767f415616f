"""Pure helpers of the quality benchmark (``benchmarks/quality.py``, ``benchmarks/peers.py``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.peers import module_path
from benchmarks.quality import (
    DI_ROW,
    bisect_budget,
    fmt,
    merge,
    report_lines,
    series,
    task_of,
    task_top1,
)
from graph_ops.cost import count
from pipeline.recovery import DEFAULT_RECOVERY


@pytest.mark.parametrize(("node", "path"), [
    ("/0/0.0/Conv", "0.0"),
    ("/2/body/body.0/body.0.0/Conv", "2.body.0.0"),
    ("/3/short/short.0/Conv", "3.short.0"),
    ("/2/b4/b4.1/b4.1.0/Conv", "2.b4.1.0"),
    ("/10/10.2/Gemm", "10.2"),
], ids=["vgg-stem", "resnet-body", "resnet-shortcut", "inception-pool-branch", "head"])
def test_module_path_maps_legacy_node_names(node: str, path: str) -> None:
    assert module_path(node) == path


def conv_model(width: int) -> onnx.ModelProto:
    """x[1,4,8,8] -> Conv(width, 3x3) -> Conv(4, 1x1): MACs linear in ``width``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(width, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(4, width, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Conv", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", [0.75, 0.5, 0.25], ids=["0.75", "0.5", "0.25"])
def test_bisect_budget_matches_the_target(target: float) -> None:
    full = count(conv_model(64)).macs
    sparsity, model, frac = bisect_budget(lambda s: conv_model(max(1, round(64 * (1 - s)))), full, target)
    assert model is not None
    assert abs(frac - target) <= 1 / 64 + 1e-9
    assert count(model).macs / full == pytest.approx(frac)
    assert 0.0 <= sparsity <= 0.98


def test_bisect_budget_reports_an_unreachable_budget() -> None:
    full = count(conv_model(64)).macs
    _, _, frac = bisect_budget(lambda s: conv_model(max(32, round(64 * (1 - s)))), full, 0.25)
    assert frac == pytest.approx(0.5)


def test_fmt_cells() -> None:
    assert fmt({"top1": 0.98765, "macs_fraction": 0.2512}) == "98.77 (0.251)"
    assert fmt(None) == "not run"
    assert fmt({"error": "PassError: no | way\nmore"}).startswith("declined: PassError: no / way")
    assert fmt({"top1": 0.5, "macs_fraction": 0.6, "note": "x"}).endswith("(budget not reached)")


def sample_doc() -> dict:
    cell = {"top1": 0.9, "macs_fraction": 0.25}
    return {"models": {"vgg": {
        "original": {"top1": 0.99},
        "diprune": {"0.25": {"di": {"none": {"top1": 0.1, "macs_fraction": 0.25},
                                    DEFAULT_RECOVERY: {"top1": 0.985, "macs_fraction": 0.25},
                                    "regress": {"top1": 0.95, "macs_fraction": 0.25}},
                             "l2": {"error": "cannot reach"}, "lda": {"none": cell}}},
        "onnxsim-l2": {"0.25": cell}}}}


def test_series_rows_and_partial_cells() -> None:
    rows = series(sample_doc()["models"]["vgg"])
    assert rows[DI_ROW]["0.25"]["top1"] == 0.985
    assert rows["di+regress"]["0.25"]["top1"] == 0.95
    assert "error" in rows["l2"]["0.25"] and "error" in rows[f"l2+{DEFAULT_RECOVERY}"]["0.25"]
    assert f"lda+{DEFAULT_RECOVERY}" not in rows  # a recovery that has not run yet is no row
    assert rows["onnxsim-l2"]["0.25"]["top1"] == 0.9


def test_report_goal_check_and_bold_best() -> None:
    text = "\n".join(report_lines(sample_doc()))
    assert "| vgg | -0.50 | 1 / 1 | 0.25: onnxsim-l2 90.00 | 0.25: di+regress 95.00 |" in text
    assert f"| {DI_ROW} | not run | not run | **98.50 (0.250)** | not run |" in text


def _tiny_head_model() -> onnx.ModelProto:
    """x[N,4] -> Gemm(transB=1) to 10 logits, whose logit c is 10*x0 + c (so logit 9 always wins)."""
    weight = np.zeros((10, 4), np.float32)
    weight[:, 0] = 10.0
    bias = np.arange(10, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="head", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_benchmark_tasks_are_the_products_task_heads() -> None:
    from pipeline.data.datasets import from_iterable

    assert task_of("3-vs-8").classes == (3, 8)
    assert task_of("odd-vs-even").groups == (("odd", (1, 3, 5, 7, 9)), ("even", (0, 2, 4, 6, 8)))
    model = task_of("3-vs-8").head(_tiny_head_model())
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2
    x = np.zeros((4, 4), np.float32)
    # logits of the restricted head are (3, 8): task class 1 (= digit 8) always wins
    assert task_top1(model, from_iterable([(x, np.array([1, 1, 0, 1]))])) == pytest.approx(0.75)
    grouped = task_of("odd-vs-even").head(_tiny_head_model())  # logit c = c: odd holds more mass (9, 7, ...)
    assert task_top1(grouped, from_iterable([(x, np.array([0, 0, 1, 0]))])) == 0.75


def test_merge_creates_and_updates_levels(tmp_path) -> None:
    path = tmp_path / "q.json"
    merge(path, ["models", "vgg", "a"], 1)
    merge(path, ["models", "vgg", "b"], {"x": 2})
    merge(path, ["models", "vgg", "a"], 3)
    assert json.loads(path.read_text()) == {"models": {"vgg": {"a": 3, "b": {"x": 2}}}}
