"""Weight algebra of training-free recovery (graph_ops.channel_fill): moments, fills, folding, writing consumers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graph_ops.channel_fill import (
    ALPHAS,
    ChannelMap,
    ChannelMoments,
    CrossMoments,
    LinearFill,
    bias_fill,
    drift_mean,
    drift_regress,
    fill_error,
    fold_fill,
    fold_map,
    map_error,
    regress_fill,
    select_drift,
    select_regress,
    write_consumer,
)
from graph_ops.errors import PreconditionError
from tests.oracles import run_ort


def _moments(a: np.ndarray) -> ChannelMoments:
    """Moments of samples ``a`` of shape (n, C, P)."""
    rows = a.transpose(0, 2, 1).reshape(-1, a.shape[1])
    return ChannelMoments(a.shape[0], a.sum(axis=0), rows.T @ rows)


def _correlated(rng: np.random.Generator, n: int, channels: int, positions: int) -> np.ndarray:
    base = rng.standard_normal((n, 3, positions))
    mix = rng.standard_normal((channels, 3))
    offsets = rng.standard_normal((channels, positions))
    return np.einsum("cb,nbp->ncp", mix, base) + offsets + 0.1 * rng.standard_normal((n, channels, positions))


KEPT = np.array([0, 2, 3, 5])
REMOVED = np.array([1, 4, 6, 7])


@pytest.mark.parametrize("positions", [1, 5], ids=["conv", "flatten-gemm"])
@pytest.mark.parametrize("kind", ["none", "bias", "regress"])
def test_fill_error_matches_brute_force(positions: int, kind: str, rng: np.random.Generator) -> None:
    a = _correlated(rng, 200, 8, positions)
    moments = _moments(a)
    fill = {"none": None, "bias": bias_fill(moments, KEPT, REMOVED),
            "regress": regress_fill(moments, KEPT, REMOVED, 1e-3)}[kind]
    pred = 0.0 if fill is None else np.einsum("rk,nkp->nrp", fill.coef, a[:, KEPT]) + fill.beta[None]
    brute = float(np.sum((a[:, REMOVED] - pred) ** 2))
    assert fill_error(moments, KEPT, REMOVED, fill) == pytest.approx(brute, rel=1e-8)


@pytest.mark.parametrize("positions", [1, 4], ids=["conv", "flatten-gemm"])
def test_regression_reduces_error_below_mean_fill(positions: int, rng: np.random.Generator) -> None:
    moments = _moments(_correlated(rng, 300, 8, positions))
    plain = fill_error(moments, KEPT, REMOVED, None)
    mean = fill_error(moments, KEPT, REMOVED, bias_fill(moments, KEPT, REMOVED))
    regress = fill_error(moments, KEPT, REMOVED, regress_fill(moments, KEPT, REMOVED, 1e-4))
    assert regress < 0.2 * mean < 0.2 * plain


def test_exact_linear_channels_are_recovered(rng: np.random.Generator) -> None:
    a_k = rng.standard_normal((500, 4, 1))
    coef, beta = rng.standard_normal((2, 4)), rng.standard_normal((2, 1))
    a = np.concatenate([a_k, np.einsum("rk,nkp->nrp", coef, a_k) + beta], axis=1)
    fill = regress_fill(_moments(a), np.arange(4), np.array([4, 5]), 1e-9)
    np.testing.assert_allclose(fill.coef, coef, atol=1e-5)
    np.testing.assert_allclose(fill.beta, beta, atol=1e-5)


def test_select_regress_picks_a_listed_alpha_and_merges(rng: np.random.Generator) -> None:
    fit, held = _moments(_correlated(rng, 200, 8, 1)), _moments(_correlated(rng, 50, 8, 1))
    fill = select_regress(fit, held, KEPT, REMOVED)
    assert fill.alpha in ALPHAS
    assert fit.merge(held).count == 250
    fixed = select_regress(fit, None, KEPT, REMOVED, (0.5,))
    assert fixed.alpha == 0.5


def _fill(rng: np.random.Generator, kept: int, removed: int, positions: int) -> LinearFill:
    return LinearFill(rng.standard_normal((removed, kept)), rng.standard_normal((removed, positions)))


def test_fold_into_conv_matches_filled_input(rng: np.random.Generator) -> None:
    """Conv without padding: W * [a_K; B a_K + β] == W' * a_K + δ exactly."""
    weight = rng.standard_normal((5, 8, 3, 3))
    fill = _fill(rng, KEPT.size, REMOVED.size, 1)
    a_k = rng.standard_normal((2, KEPT.size, 6, 6))
    full = np.zeros((2, 8, 6, 6))
    full[:, KEPT] = a_k
    full[:, REMOVED] = np.einsum("rk,nkhw->nrhw", fill.coef, a_k) + fill.beta[None, :, :, None]
    new_weight, delta = fold_fill(weight, 1, 1, KEPT, fill)
    want = torch.nn.functional.conv2d(torch.from_numpy(full), torch.from_numpy(weight))
    got = torch.nn.functional.conv2d(torch.from_numpy(a_k), torch.from_numpy(new_weight),
                                     torch.from_numpy(delta))
    assert new_weight.shape == (5, KEPT.size, 3, 3)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1], ids=["k-rows", "transB"])
def test_fold_into_flattened_gemm_matches_filled_input(axis: int, rng: np.random.Generator) -> None:
    positions = 3
    weight = rng.standard_normal((8 * positions, 7))
    weight = weight if axis == 0 else weight.T.copy()
    fill = _fill(rng, KEPT.size, REMOVED.size, positions)
    a_k = rng.standard_normal((4, KEPT.size, positions))
    full = np.zeros((4, 8, positions))
    full[:, KEPT] = a_k
    full[:, REMOVED] = np.einsum("rk,nkp->nrp", fill.coef, a_k) + fill.beta[None]
    new_weight, delta = fold_fill(weight, axis, positions, KEPT, fill)
    dense = (lambda w: w) if axis == 0 else (lambda w: w.T)
    want = full.reshape(4, -1) @ dense(weight)
    got = a_k.reshape(4, -1) @ dense(new_weight) + delta
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_fold_rejects_wrong_block() -> None:
    with pytest.raises(PreconditionError, match="blocks"):
        fold_fill(np.zeros((10, 3)), 0, 3, np.array([0]), LinearFill(np.zeros((2, 1)), np.zeros((2, 3))))


def _single(op: str, weight: np.ndarray, bias: np.ndarray | None, shape: list[int], **attrs: object) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight, "w")] + ([] if bias is None else [numpy_helper.from_array(bias, "b")])
    node = helper.make_node(op, ["x", "w"] + ([] if bias is None else ["b"]), ["y"], name="q", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_write_conv_consumer_adds_delta(with_bias: bool, rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32) if with_bias else None
    model = _single("Conv", w, b, [1, 3, 5, 5], kernel_shape=[3, 3])
    delta = np.arange(4.0)
    write_consumer(model, 0, w * 2, delta)
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    bias = (b if with_bias else np.zeros(4, np.float32)) + delta.astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w * 2), torch.from_numpy(bias))
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], ref.numpy(), rtol=1e-5, atol=1e-5)
    assert {t.name for t in model.graph.initializer} == {model.graph.node[0].input[1], model.graph.node[0].input[2]}


def test_write_gemm_scales_delta_by_alpha_over_beta(rng: np.random.Generator) -> None:
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    model = _single("Gemm", w, b, [2, 6], alpha=2.0, beta=0.5)
    delta = rng.standard_normal(4)
    write_consumer(model, 0, w, delta)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], 2 * x @ w + 0.5 * b + 2 * delta, rtol=1e-4, atol=1e-4)


def test_write_matmul_consumer_is_refused(rng: np.random.Generator) -> None:
    w = rng.standard_normal((6, 4)).astype(np.float32)
    model = _single("MatMul", w, None, [2, 6])
    with pytest.raises(PreconditionError, match="no writable bias"):
        write_consumer(model, 0, w, np.zeros(4))


def test_write_rejects_shape_mismatch(rng: np.random.Generator) -> None:
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    model = _single("Conv", w, None, [1, 3, 2, 2], kernel_shape=[1, 1])
    with pytest.raises(PreconditionError, match="shape"):
        write_consumer(model, 0, w[:, :2], np.zeros(4))


def _cross(a: np.ndarray, z: np.ndarray) -> CrossMoments:
    """Cross moments of samples ``a`` (n, C, P) and ``z`` (n, K, P)."""
    ra, rz = (v.transpose(0, 2, 1).reshape(-1, v.shape[1]) for v in (a, z))
    return CrossMoments(a.shape[0], a.sum(axis=0), z.sum(axis=0), ra.T @ ra, rz.T @ rz, ra.T @ rz)


@pytest.mark.parametrize("positions", [1, 3], ids=["conv", "flatten-gemm"])
def test_drift_solvers_reduce_to_fills_without_drift(positions: int, rng: np.random.Generator) -> None:
    a = _correlated(rng, 200, 8, positions)
    cross, moments = _cross(a, a[:, KEPT]), _moments(a)
    for got, want in ((drift_mean(cross, KEPT), bias_fill(moments, KEPT, REMOVED)),
                      (drift_regress(cross, KEPT, 1e-3), regress_fill(moments, KEPT, REMOVED, 1e-3))):
        expect = want.as_map(8, KEPT)
        np.testing.assert_allclose(got.matrix, expect.matrix, atol=1e-8)
        np.testing.assert_allclose(got.offset, expect.offset, atol=1e-8)
        assert map_error(cross, got) == pytest.approx(fill_error(moments, KEPT, REMOVED, want), rel=1e-6)


def test_drift_regression_corrects_drifted_inputs(rng: np.random.Generator) -> None:
    """z = a_K scaled, mixed and shifted (upstream pruning): regression undoes it, mean-only cannot."""
    a = _correlated(rng, 400, 8, 2)
    mix = np.eye(KEPT.size) * 0.7 + 0.1 * rng.standard_normal((KEPT.size, KEPT.size))
    z = np.einsum("jk,nkp->njp", mix, a[:, KEPT]) + 0.5
    cross = _cross(a, z)
    cmap = select_drift(cross, None, KEPT)
    pred = np.einsum("ck,nkp->ncp", cmap.matrix, z) + cmap.offset[None]
    assert map_error(cross, cmap) == pytest.approx(float(np.sum((a - pred) ** 2)), rel=1e-6)
    assert map_error(cross, cmap) < 0.1 * map_error(cross, drift_mean(cross, KEPT))
    assert cross.merge(cross).count == 800


def test_fold_map_matches_mapped_input(rng: np.random.Generator) -> None:
    positions, weight = 2, rng.standard_normal((8 * 2, 5))
    cmap = ChannelMap(rng.standard_normal((8, KEPT.size)), rng.standard_normal((8, positions)))
    z = rng.standard_normal((3, KEPT.size, positions))
    full = np.einsum("ck,nkp->ncp", cmap.matrix, z) + cmap.offset[None]
    new_weight, delta = fold_map(weight, 0, positions, KEPT, cmap)
    np.testing.assert_allclose(z.reshape(3, -1) @ new_weight + delta, full.reshape(3, -1) @ weight, atol=1e-9)


def test_select_drift_falls_back_to_mean_when_regression_overfits(rng: np.random.Generator) -> None:
    """z unrelated to a and few samples: no ridge factor beats the mean-only map on held-out data."""
    kept = np.arange(6)
    fit = _cross(rng.standard_normal((10, 8, 1)), rng.standard_normal((10, 6, 1)))
    held = _cross(rng.standard_normal((40, 8, 1)), rng.standard_normal((40, 6, 1)))
    chosen = select_drift(fit, held, kept)
    assert chosen.alpha is None
    np.testing.assert_allclose(chosen.matrix, drift_mean(fit.merge(held), kept).matrix)
