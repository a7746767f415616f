"""expose_tensors: extra outputs with inferred types, original outputs first and unchanged, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.errors import PreconditionError, UserInputError
from graph_ops.probes import expose_tensors


def _model() -> onnx.ModelProto:
    """input(N,2,6,6) -> Conv(4) -> Relu -> GAP -> Flatten -> Gemm(3) -> logits; also a second output 'gap'."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (4, 2, 3, 3)), ("b", (4,)), ("fw", (3, 4)), ("fb", (3,)))]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "probe_test",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("gap", TensorProto.FLOAT, ["N", 4, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


def test_exposed_tensors_follow_original_outputs_and_values_are_unchanged() -> None:
    model = _model()
    exposed = expose_tensors(model, ["relu", "conv", "relu"])
    assert [o.name for o in exposed.graph.output] == ["logits", "gap", "relu", "conv"]
    onnx.checker.check_model(exposed, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 6)).astype(np.float32)
    before, after = _run(model, x), _run(exposed, x)
    np.testing.assert_array_equal(before["logits"], after["logits"])
    np.testing.assert_array_equal(after["relu"], np.maximum(after["conv"], 0))
    assert after["relu"].shape == (2, 4, 6, 6)


def test_inferred_type_and_symbolic_batch_are_recorded() -> None:
    exposed = expose_tensors(_model(), ["relu"])
    ttype = exposed.graph.output[-1].type.tensor_type
    assert ttype.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in ttype.shape.dim] == ["N", 4, 6, 6]


def test_input_model_is_not_modified_and_existing_output_is_not_duplicated() -> None:
    model = _model()
    before = model.SerializeToString()
    exposed = expose_tensors(model, ["gap", "logits"])
    assert model.SerializeToString() == before
    assert [o.name for o in exposed.graph.output] == ["logits", "gap"]


@pytest.mark.parametrize(("name", "hint"), [("rleu", "did you mean relu"), ("fw", "not a graph input"),
                                            ("no_such_tensor_xyz", "diprune inspect")], ids=["typo", "weight", "none"])
def test_unknown_names_raise_with_a_hint(name: str, hint: str) -> None:
    with pytest.raises(UserInputError, match=f"cannot expose tensor '{name}'") as info:
        expose_tensors(_model(), [name])
    assert hint in str(info.value)


def test_untypeable_tensor_is_a_precondition_error() -> None:
    model = _model()
    model.graph.node.append(helper.make_node("MysteryOp", ["relu"], ["mystery"], name="m", domain="custom.x"))
    model.opset_import.append(helper.make_opsetid("custom.x", 1))
    with pytest.raises(PreconditionError, match=r"'mystery'.*element type could not be inferred"):
        expose_tensors(model, ["mystery"])
