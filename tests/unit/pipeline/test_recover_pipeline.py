"""Training-free recovery end to end: statistics through onnxruntime, rewritten consumers, unchanged interface."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.groups import ChannelGroupIndex
from graph_ops.probes import expose_tensors
from graph_ops.prune import apply_plan
from pipeline.data.datasets import Dataset, from_iterable
from pipeline.errors import UserInputError
from pipeline.recovery import RECOVERY, consumer_targets, layer_levels, recover
from pipeline.recovery.frontier import ALIGN
from tests.graphs import (
    concat,
    conv_transpose,
    depthwise_separable,
    flatten_gemm,
    matmul_head,
    residual,
    token_matmul,
)
from tests.oracles import assert_same_outputs, random_valid_plan, recovered_reference, run_ort

SIDE = 8


def _correlated_net(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv A (16 correlated channels) -> Relu -> Conv Q (6) -> Relu -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((4, 3 * 9))
    w_a = (rng.standard_normal((16, 4)) @ base + 0.1 * rng.standard_normal((16, 27))).reshape(16, 3, 3, 3) / 5
    inits = {"w_a": w_a, "b_a": rng.standard_normal(16) * 0.3, "w_q": rng.standard_normal((6, 16, 3, 3)) / 12,
             "b_q": rng.standard_normal(6) * 0.3, "w_g": rng.standard_normal((10, 6 * SIDE * SIDE)) / 20,
             "b_g": rng.standard_normal(10) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w_a", "b_a"], ["a"], name="conv_a", pads=[1] * 4, kernel_shape=[3, 3]),
             helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
             helper.make_node("Conv", ["a_relu", "w_q", "b_q"], ["q"], name="conv_q", pads=[1] * 4,
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["q"], ["q_relu"], name="relu_q"),
             helper.make_node("Flatten", ["q_relu"], ["flat"], name="flatten", axis=1),
             helper.make_node("Gemm", ["flat", "w_g", "b_g"], ["logits"], name="gemm", transB=1)]
    graph = helper.make_graph(
        nodes, "correlated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return canonicalize(onnx.shape_inference.infer_shapes(model))


def _data(seed: int, n: int) -> Dataset:
    x = np.random.default_rng(seed).standard_normal((n, 3, SIDE, SIDE)).astype(np.float32)
    return from_iterable([(x, None)], name=f"gaussian{seed}")


def _group(index: ChannelGroupIndex, size: int) -> str:
    return next(g.id for g in index.groups if g.prunable and g.size == size)


@pytest.fixture(scope="module")
def net() -> tuple[onnx.ModelProto, ChannelGroupIndex]:
    model = _correlated_net()
    return model, analyze(model)


def _relative_error(ref: onnx.ModelProto, model: onnx.ModelProto, tensor: str, x: np.ndarray) -> float:
    want = run_ort(expose_tensors(ref, [tensor]), {"x": x})[-1].astype(np.float64)
    got = run_ort(expose_tensors(model, [tensor]), {"x": x})[-1]
    return float(np.sum((want - got) ** 2) / np.sum(want**2))


@pytest.mark.parametrize(("size", "kept", "tensor"), [(16, 10, "q"), (6, 3, "logits")], ids=["conv", "flatten-gemm"])
def test_each_method_reduces_consumer_error(net: tuple, size: int, kept: int, tensor: str) -> None:
    model, index = net
    keep = {_group(index, size): range(kept)}
    pruned = apply_plan(model, index, keep)
    x = next(iter(_data(1, 64).batches(64)))[0]["input"]
    errors = {}
    for method in ("none", "bias", "regress", "lstsq"):
        recovered, _ = recover(model, pruned, index, keep, _data(0, 1500), method=method, sequential=False,
                               intra_op_threads=1)
        errors[method] = _relative_error(model, recovered, tensor, x)
    assert errors["lstsq"] < errors["regress"] < errors["bias"] < errors["none"], errors
    assert errors["regress"] < 0.5 * errors["none"], errors


def _io(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "sequential"])
@pytest.mark.parametrize("method", sorted(RECOVERY))
def test_interface_unchanged_and_checker_passes(net: tuple, method: str, sequential: bool) -> None:
    model, index = net
    keep = {_group(index, 16): [1, 3, 5, 7, 9, 11, 13], _group(index, 6): [0, 2, 4]}
    pruned = apply_plan(model, index, keep)
    before = pruned.SerializeToString()
    recovered, report = recover(model, pruned, index, keep, _data(0, 100), method=method, batch_size=32,
                                sequential=sequential, intra_op_threads=1)
    assert pruned.SerializeToString() == before
    assert _io(recovered) == _io(pruned)
    assert [v.name for v in recovered.graph.input] == [v.name for v in model.graph.input]
    onnx.checker.check_model(recovered, full_check=True)
    assert run_ort(recovered, {"x": np.zeros((2, 3, SIDE, SIDE), np.float32)})[0].shape == (2, 10)
    assert len(report.consumers) == (0 if method == "none" else 2)


def test_report_names_consumers_and_is_json(net: tuple) -> None:
    model, index = net
    keep = {_group(index, 16): range(8), _group(index, 6): range(4)}
    _, report = recover(model, apply_plan(model, index, keep), index, keep, _data(0, 200), method="regress",
                        sequential=False, intra_op_threads=1)
    found = {c.node: c for c in report.consumers}
    assert sorted(found) == ["conv_q", "gemm"]
    assert (found["conv_q"].kept, found["conv_q"].removed) == (8, 8)
    assert (found["gemm"].kept, found["gemm"].removed) == (4, 2)
    assert all(c.alpha in (1e-4, 1e-3, 1e-2) and c.error_after <= c.error_mean <= 1.0 for c in report.consumers)
    assert report.samples == 200
    assert json.loads(json.dumps(report.to_dict()))["method"] == "regress"


def test_the_report_says_how_much_the_frontier_spilled_and_where_the_time_went(net: tuple, tmp_path) -> None:
    model, index = net
    keep = {_group(index, 16): [1, 3, 5, 7, 9, 11, 13], _group(index, 6): [0, 2, 4]}
    pruned = apply_plan(model, index, keep)
    spilled, seconds = {}, {}
    for budget in (0, 1 << 30):
        _, report = recover(model, pruned, index, keep, _data(0, 100), method="lstsq", batch_size=32,
                            intra_op_threads=1, spill_bytes=budget, spill_dir=str(tmp_path))
        spilled[budget] = report.to_dict()["sweep"]["spill_bytes"]
        seconds[budget] = report.to_dict()["sweep"]["seconds"]
    assert spilled[1 << 30] == 0  # everything fit in memory
    assert spilled[0] > 0 and spilled[0] % ALIGN == 0  # extents of whole pages
    assert seconds[1 << 30]["spill_write"] == 0.0  # nothing written
    for took in seconds.values():
        assert set(took) == {"onnxruntime_original", "onnxruntime_current", "fold", "spill_write"}
        assert took["onnxruntime_current"] > 0 and took["fold"] > 0 and all(v >= 0 for v in took.values())
    assert list(tmp_path.iterdir()) == []  # and the file is gone


def test_fixed_ridge_is_used(net: tuple) -> None:
    model, index = net
    keep = {_group(index, 16): range(8)}
    _, report = recover(model, apply_plan(model, index, keep), index, keep, _data(0, 50), method="regress",
                        ridge=0.3, intra_op_threads=1)
    assert [c.alpha for c in report.consumers] == [0.3]


def test_none_needs_no_data_and_returns_the_pruned_model(net: tuple) -> None:
    model, index = net
    keep = {_group(index, 16): range(8)}
    pruned = apply_plan(model, index, keep)
    recovered, report = recover(model, pruned, index, keep, None, method="none")
    assert recovered.SerializeToString() == pruned.SerializeToString()
    assert report.consumers == () and report.samples == 0


@pytest.mark.parametrize(("method", "data", "match"), [("ridge", "yes", "unknown recovery"),
                                                       ("bias", None, "needs calibration data")],
                         ids=["unknown-method", "no-data"])
def test_bad_requests_are_user_errors(net: tuple, method: str, data: object, match: str) -> None:
    model, index = net
    keep = {_group(index, 16): range(8)}
    dataset = _data(0, 10) if data else None
    with pytest.raises(UserInputError, match=match):
        recover(model, apply_plan(model, index, keep), index, keep, dataset, method=method)


@pytest.mark.parametrize(("motif", "reason"), [(matmul_head, "MatMul"), (conv_transpose, "strided ConvTranspose")],
                         ids=["matmul", "conv-transpose"])
def test_unsupported_consumer_is_skipped_and_recorded(motif: object, reason: str) -> None:
    model, _ = motif()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): range(4)}
    pruned = apply_plan(model, index, keep)
    x = np.random.default_rng(0).standard_normal((6, 1, 3, 8, 8)).astype(np.float32)
    data = from_iterable([(item, None) for item in x])
    recovered, report = recover(model, pruned, index, keep, data, method="regress", batch_size=1,
                                intra_op_threads=1)
    assert report.consumers == ()
    assert len(report.skipped) == 1 and reason in report.skipped[0][1]
    assert recovered.SerializeToString() == pruned.SerializeToString()


@pytest.mark.slow
def test_mnist_regress_beats_plain_removal() -> None:
    """The shipped MNIST CNN at 30 % MACs (l2 plan): regression recovery restores held-out accuracy, and the
    sequential (error-accumulation corrected) variant does at least as well."""
    from pipeline.data.datasets import mnist_path
    from pipeline.data.named import open_dataset
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.model.prepare import prepare
    from pipeline.prune.orchestrate import keep_lists, score
    from pipeline.selection.allocate import select_channels

    prepared = prepare(mnist_path().with_name("mnist_cnn.onnx"))
    plan = select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.3)
    keep = keep_lists(plan)
    pruned = apply_plan(prepared.model, prepared.index, keep)
    calib, test = open_dataset("mnist", split="train", limit=600), open_dataset("mnist", split="test", limit=500)
    top1 = {"none": evaluate(pruned, test, intra_op_threads=1).top1}
    for sequential in (False, True):
        recovered, _ = recover(prepared.model, pruned, prepared.index, keep, calib, method="regress",
                               sequential=sequential, intra_op_threads=1)
        top1[sequential] = evaluate(recovered, test, intra_op_threads=1).top1
    assert top1[False] > top1["none"] + 0.2, top1
    assert top1[True] >= top1[False], top1


def test_sequential_levels_and_first_level_equals_one_pass(net: tuple) -> None:
    model, index = net
    keep = {_group(index, 16): range(8), _group(index, 6): range(3)}
    pruned = apply_plan(model, index, keep)
    targets, _ = consumer_targets(model, index, keep)
    assert [t.node for t in targets] == ["conv_q", "gemm"]
    assert layer_levels(model, [t.index for t in targets]) == [0, 1]
    x = next(iter(_data(1, 64).batches(64)))[0]["input"]
    outs, errors = [], []
    for sequential in (False, True):
        recovered, report = recover(model, pruned, index, keep, _data(0, 300), method="regress",
                                    sequential=sequential, intra_op_threads=1)
        outs.append(run_ort(expose_tensors(recovered, ["q"]), {"x": x})[-1])
        errors.append(_relative_error(model, recovered, "logits", x))
        assert ("sequential" in report.notes[0]) == sequential
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert errors[1] < errors[0]


def test_consumer_that_also_loses_outputs_keeps_its_recovered_rows(net: tuple) -> None:
    """conv_q reads pruned A and is itself pruned: its kept rows equal those of the A-only recovery."""
    model, index = net
    keep_a = {_group(index, 16): range(8)}
    keep_both = {**keep_a, _group(index, 6): [1, 4]}
    x = next(iter(_data(1, 8).batches(8)))[0]["input"]
    outs = []
    for keep in (keep_a, keep_both):
        recovered, _ = recover(model, apply_plan(model, index, keep), index, keep, _data(0, 100), method="regress",
                               sequential=False, ridge=1e-3, intra_op_threads=1)
        outs.append(run_ort(expose_tensors(recovered, ["q"]), {"x": x})[-1])
    np.testing.assert_allclose(outs[1], outs[0][:, [1, 4]], rtol=1e-4, atol=1e-5)


def _static_batches(model: onnx.ModelProto, n: int, seed: int = 4) -> tuple[Dataset, np.ndarray]:
    """``n`` single-sample Gaussian batches for a model with a static batch of 1 (the motifs), and the samples."""
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal((n, 1, *shape[1:])).astype(np.float32)
    return from_iterable([(item, None) for item in x]), x


MOTIFS = {"correlated": lambda: (_correlated_net(), None), "depthwise": depthwise_separable,
          "flatten-gemm": flatten_gemm, "concat": concat, "residual": residual, "token-matmul": token_matmul,
          "conv-transpose": conv_transpose}


@pytest.mark.parametrize("motif", MOTIFS.values(), ids=MOTIFS.keys())
def test_lstsq_model_equals_its_mask_reference(motif: object) -> None:
    """The refit pruned model computes what the original-size model with the same refit weights and the removed
    channels masked (graph_ops.mask) computes: the refit writes every weight in the surgery's layout."""
    model, _ = motif()
    model = canonicalize(model)
    index = analyze(model)
    keep = random_valid_plan(index, np.random.default_rng(3), 0.4, 0.8)
    data, x = _static_batches(model, 40)
    recovered, report = recover(model, apply_plan(model, index, keep), index, keep, data, method="lstsq",
                                batch_size=1, refit_positions=None, intra_op_threads=1)
    onnx.checker.check_model(recovered, full_check=True)
    refit = {c.node for c in report.consumers if c.alpha is not None}
    assert refit, report
    reference = recovered_reference(model, recovered, index, keep, refit)
    assert_same_outputs(reference, recovered, {model.graph.input[0].name: x[0]}, rtol=1e-4, atol=1e-5)


def test_lstsq_refits_depthwise_layers_per_group() -> None:
    model, _ = depthwise_separable()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): [0, 2, 3, 5, 6, 7]}
    data, _ = _static_batches(model, 30, seed=1)
    _, report = recover(model, apply_plan(model, index, keep), index, keep, data, method="lstsq", batch_size=1,
                        intra_op_threads=1)
    ops = {c.op_type: c for c in report.consumers}
    depthwise = next(c for c in report.consumers if c.dim == 3 * 3 + 1)  # one channel x 3x3 taps + intercept
    assert depthwise.op_type == "Conv" and set(ops) == {"Conv", "Gemm"}


@pytest.mark.parametrize("positions", [None, 5], ids=["whole-tensors", "gathered-positions"])
def test_lstsq_refits_a_strided_conv_transpose_and_lowers_its_output_error(positions: int | None) -> None:
    """A stride-2 ConvTranspose whose input lost channels is refit (R3 on its transposed patches; R1 / R2 skip it):
    its held-out error goes down and its output moves towards the original's, whether all positions or a few are
    gathered inside the graph (the taps of the other phases must be masked: unmasked, the refit made it worse)."""
    model, _ = conv_transpose()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): [0, 2, 3, 5, 7]}
    data, x = _static_batches(model, 40, seed=5)
    pruned = apply_plan(model, index, keep)
    recovered, report = recover(model, pruned, index, keep, data, method="lstsq", batch_size=1,
                                refit_positions=positions, intra_op_threads=1)
    layer = next(c for c in report.consumers if c.op_type == "ConvTranspose")
    assert layer.dim == 5 * 2 * 2 + 1 and layer.alpha is not None and layer.error_after < layer.error_before
    out = next(n.output[0] for n in model.graph.node if n.op_type == "ConvTranspose")
    err = {"plain": 0.0, "lstsq": 0.0, "norm": 0.0}
    for sample in x[4::5]:  # the held-out batches (every fifth)
        want = run_ort(expose_tensors(model, [out]), {"x": sample})[-1]
        err["norm"] += float(np.sum(want**2))
        for name, m in (("plain", pruned), ("lstsq", recovered)):
            err[name] += float(np.sum((run_ort(expose_tensors(m, [out]), {"x": sample})[-1] - want) ** 2))
    assert err["lstsq"] < 0.9 * err["plain"], err
    # the refit's own held-out estimate is the measured relative error of the weights it had (on every position;
    # on 5 sampled positions per image, close to it)
    assert err["plain"] / err["norm"] == pytest.approx(layer.error_before, rel=1e-3 if positions is None else 0.2)


def test_lstsq_refits_a_matmul_consumer_without_intercept() -> None:
    model, _ = matmul_head()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): range(5)}
    data, x = _static_batches(model, 60, seed=2)
    pruned = apply_plan(model, index, keep)
    recovered, report = recover(model, pruned, index, keep, data, method="lstsq", batch_size=1, intra_op_threads=1)
    matmuls = [c for c in report.consumers if c.op_type == "MatMul"]
    assert matmuls and all(c.dim == 5 for c in matmuls[:1]), report  # 5 kept inputs, no intercept column
    feeds = {"x": x[0]}
    want = run_ort(model, feeds)[0]
    err = {name: float(np.sum((run_ort(m, feeds)[0] - want) ** 2)) for name, m in (("plain", pruned),
                                                                                 ("lstsq", recovered))}
    assert err["lstsq"] < err["plain"], err


def test_lstsq_gives_too_large_layers_to_regress_and_still_equals_its_mask_reference() -> None:
    """refit_max_dim below the Flatten -> Gemm head's unknowns: that layer gets R2 at its level, the conv R3."""
    model, _ = flatten_gemm()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): [0, 1, 3, 4, 6, 7]}
    data, x = _static_batches(model, 40)
    recovered, report = recover(model, apply_plan(model, index, keep), index, keep, data, method="lstsq",
                                batch_size=1, refit_max_dim=100, intra_op_threads=1)
    kinds = {c.node: type(c).__name__ for c in report.consumers}
    assert sorted(kinds.values()) == ["ConsumerRecovery", "LayerRefit"], kinds  # the 6*64+1 head, the 17-input Gemm
    refit = {c.node for c in report.consumers if c.alpha is not None}
    assert_same_outputs(recovered_reference(model, recovered, index, keep, refit), recovered, {"x": x[0]},
                        rtol=1e-4, atol=1e-5)


def test_lstsq_skips_a_too_large_layer_that_regress_cannot_take() -> None:
    model, _ = matmul_head()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): range(5)}
    data, _ = _static_batches(model, 20)
    _, report = recover(model, apply_plan(model, index, keep), index, keep, data, method="lstsq", batch_size=1,
                        refit_max_dim=4, intra_op_threads=1)
    reasons = dict(report.skipped)
    assert any("more than 4 unknowns" in r for r in reasons.values()), reasons


def test_lstsq_refits_a_matmul_over_the_last_axis_of_tokens() -> None:
    """A transformer-style MatMul on a 3-D input [N, tokens, C] is refit with one row per sampled token (it used to
    stop recovery with a PreconditionError), and lowers the error the upstream pruning left at its output."""
    model, _ = token_matmul()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): [0, 2, 3, 6]}
    data, x = _static_batches(model, 60, seed=4)
    pruned = apply_plan(model, index, keep)
    recovered, report = recover(model, pruned, index, keep, data, method="lstsq", batch_size=1, refit_positions=16,
                                intra_op_threads=1)
    matmul = [c for c in report.consumers if c.op_type == "MatMul"]
    assert len(matmul) == 1 and matmul[0].dim == 8 and not report.skipped, report
    assert matmul[0].rows == 60 * 16 and matmul[0].alpha is not None  # 16 of the 64 tokens of each image
    assert matmul[0].error_after < matmul[0].error_before
    out = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul")
    err = {"plain": 0.0, "lstsq": 0.0}
    for sample in x[:10]:  # the motif's batch is 1
        want = run_ort(expose_tensors(model, [out]), {"x": sample})[-1]
        for name, m in (("plain", pruned), ("lstsq", recovered)):
            err[name] += float(np.sum((run_ort(expose_tensors(m, [out]), {"x": sample})[-1] - want) ** 2))
    assert err["lstsq"] < 0.8 * err["plain"], err


def test_refit_positions_grow_for_a_wide_layer_on_few_images_within_a_bound() -> None:
    """R3 samples more positions per image where the fitted rows would fall short of 10 per unknown (bounded at 4x
    the default), and never fewer than asked; without a count of images or with every position asked, as given."""
    from pipeline.recovery.refit import POSITION_GROWTH, refit_positions

    assert refit_positions(64, 865, 50) == 217  # 40 fitted pages x 217 positions >= 8,650 rows
    assert refit_positions(64, 865, 2000) == 64  # enough images already
    assert refit_positions(64, 4609, 10) == POSITION_GROWTH * 64  # bounded
    assert refit_positions(None, 865, 50) is None and refit_positions(64, 865, None) == 64


def test_a_layer_behind_a_global_pool_gets_a_position_prior_that_only_helps(monkeypatch) -> None:
    """The head Gemm reads GlobalAveragePool -> Flatten (one row per image): its refit may blend in per-position
    rows of the pool's input (targets: the original Gemm at each position). The prior is planned for that layer
    only, its held-out error is never above the refit without it, and the model still equals its mask reference;
    reading whole tensors (sizes unknown) gives the same refit as the in-graph gathers."""
    from graph_ops import least_squares
    from pipeline.recovery import refit

    model, _ = depthwise_separable()
    model = canonicalize(model)
    index = analyze(model)
    keep = {_group(index, 8): [0, 2, 3, 5, 6]}
    data, x = _static_batches(model, 15, seed=6)
    pruned = apply_plan(model, index, keep)
    layers, _ = refit.refit_targets(model, pruned, index, keep)
    assert [lay.shape.op_type for lay in layers if lay.pooled is not None] == ["Gemm"]
    options = {"method": "lstsq", "batch_size": 1, "intra_op_threads": 1}

    def head(found: object) -> object:
        return next(c for c in found.consumers if c.op_type == "Gemm")

    recovered, report = recover(model, pruned, index, keep, data, **options)
    refit_names = {c.node for c in report.consumers if c.alpha is not None}
    assert_same_outputs(recovered_reference(model, recovered, index, keep, refit_names), recovered, {"x": x[0]},
                        rtol=1e-4, atol=1e-5)
    originals = refit.refit_targets

    def without_sizes(*args: object, **kwargs: object) -> tuple:
        found, skipped = originals(*args, **kwargs)
        return [layer if layer.pooled is None else dataclasses.replace(
            layer, pooled=dataclasses.replace(layer.pooled, size=None)) for layer in found], skipped

    monkeypatch.setattr(refit, "refit_targets", without_sizes)
    _, whole = recover(model, pruned, index, keep, data, **options)
    assert head(whole).prior_weight == head(report).prior_weight
    assert head(whole).error_after == pytest.approx(head(report).error_after, rel=1e-6)
    monkeypatch.setattr(least_squares, "PRIOR_WEIGHTS", (0.0,))
    _, plain = recover(model, pruned, index, keep, data, **options)
    assert head(plain).prior_weight == 0.0 and head(report).error_after <= head(plain).error_after
