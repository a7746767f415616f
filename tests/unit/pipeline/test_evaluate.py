"""evaluate: top-1/top-5, agreement and relative logit error exactly as numpy computes them from known logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.data.datasets import from_iterable
from pipeline.errors import UserInputError
from pipeline.evaluation.evaluate import EvalReport, evaluate


def _linear(weights: np.ndarray) -> onnx.ModelProto:
    """logits = input @ weights: with the identity, the logits are the inputs (known exactly)."""
    k_in, k_out = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"], name="fc")], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", k_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k_out])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _data(n: int, k: int, *, labels: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32)
    return x, (rng.integers(0, k, n) if labels else None)


def _dataset(x: np.ndarray, y: np.ndarray | None):
    return from_iterable([(x, y)], name="known-logits")


def test_top1_and_top5_equal_numpy_on_known_logits() -> None:
    x, y = _data(100, 10)
    report = evaluate(_linear(np.eye(10)), _dataset(x, y), batch_size=16, backend="ort-cpu")
    top5 = np.mean([label in np.argsort(-row)[:5] for row, label in zip(x, y, strict=True)])
    assert report == EvalReport(n=100, top1=float(np.mean(x.argmax(1) == y)), top5=float(top5))
    assert 0.0 < report.top1 < report.top5 < 1.0


def test_agreement_and_relative_logit_error_against_a_reference(tmp_path: Path) -> None:
    x, y = _data(64, 10, seed=1)
    w = np.eye(10) + 0.3 * np.random.default_rng(2).standard_normal((10, 10))
    reference = tmp_path / "reference.onnx"
    onnx.save(_linear(np.eye(10)), str(reference))
    report = evaluate(_linear(w), _dataset(x, y), reference=reference, batch_size=10)
    a = x.astype(np.float64) @ w.astype(np.float32).astype(np.float64)
    agreement = float(np.mean(a.argmax(1) == x.argmax(1)))
    assert report.agreement == agreement
    assert 0.0 < agreement < 1.0
    assert report.relative_logit_error == pytest.approx(np.linalg.norm(a - x) / np.linalg.norm(x), rel=1e-5)
    assert report.top1 == float(np.mean(a.argmax(1) == y))


def test_identical_reference_agrees_fully() -> None:
    x, y = _data(20, 10)
    report = evaluate(_linear(np.eye(10)), _dataset(x, y), reference=_linear(np.eye(10)))
    assert (report.agreement, report.relative_logit_error) == (1.0, 0.0)
    assert report.to_dict() == {"n": 20, "top1": report.top1, "top5": report.top5, "agreement": 1.0,
                                "relative_logit_error": 0.0,
                                "outputs": {"logits": {"relative_error": 0.0, "cosine": 1.0, "max_abs_diff": 0.0}}}


@pytest.mark.parametrize(("k", "labels", "expect_top1", "expect_top5"),
                         [(4, True, True, False), (5, True, True, False), (6, True, True, True),
                          (10, False, False, False)], ids=["k4", "k5", "k6", "unlabelled"])
def test_top5_only_beyond_five_classes_and_accuracy_only_with_labels(k: int, labels: bool, expect_top1: bool,
                                                                     expect_top5: bool) -> None:
    x, y = _data(30, k, labels=labels)
    report = evaluate(_linear(np.eye(k)), _dataset(x, y))
    assert (report.top1 is not None, report.top5 is not None) == (expect_top1, expect_top5)
    assert report.n == 30


def test_ties_in_top5_count_for_the_label() -> None:
    x = np.zeros((2, 8), np.float32)
    x[:, :6] = 1.0  # six equal maxima
    report = evaluate(_linear(np.eye(8)), _dataset(x, np.array([0, 5])))
    assert (report.top1, report.top5) == (0.5, 1.0)


def test_non_classifier_output_without_reference_is_rejected() -> None:
    model = _linear(np.eye(4))
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1
    with pytest.raises(UserInputError, match=r"not \(N, K\) class scores.*--reference"):
        evaluate(model, _dataset(*_data(4, 4)))


def _detector(weights: np.ndarray, scale: float) -> onnx.ModelProto:
    """Two non-classifier outputs: boxes = input @ W as (N, K, 1), and scores = input * scale (N, K, 1)."""
    k = weights.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["mm"], name="fc"),
         helper.make_node("Unsqueeze", ["mm", "axes"], ["boxes"], name="unsq"),
         helper.make_node("Mul", ["input", "s"], ["ms"], name="mul"),
         helper.make_node("Unsqueeze", ["ms", "axes"], ["scores"], name="unsq2")], "detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", k, 1]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", k, 1])],
        [numpy_helper.from_array(weights.astype(np.float32), "w"), numpy_helper.from_array(np.array([2], np.int64),
                                                                                            "axes"),
         numpy_helper.from_array(np.array(scale, np.float32), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_output_fidelity_of_a_non_classifier_equals_numpy() -> None:
    x, _ = _data(40, 6, labels=False, seed=3)
    w = np.eye(6) + 0.2 * np.random.default_rng(4).standard_normal((6, 6))
    report = evaluate(_detector(w, 1.5), _dataset(x, None), reference=_detector(np.eye(6), 1.0), batch_size=7)
    assert (report.top1, report.top5, report.agreement, report.relative_logit_error) == (None, None, None, None)
    x64 = x.astype(np.float64)
    for name, a in (("boxes", x64 @ w.astype(np.float32).astype(np.float64)), ("scores", 1.5 * x64)):
        got = report.outputs[name]
        assert got["relative_error"] == pytest.approx(np.linalg.norm(a - x64) / np.linalg.norm(x64), rel=1e-5)
        cosine = float((a * x64).sum() / (np.linalg.norm(a) * np.linalg.norm(x64)))
        assert got["cosine"] == pytest.approx(cosine, rel=1e-6)
        assert got["max_abs_diff"] == pytest.approx(float(np.abs(a - x64).max()), rel=1e-5)
    assert report.outputs["scores"]["cosine"] == pytest.approx(1.0)  # a scaled output points the same way
