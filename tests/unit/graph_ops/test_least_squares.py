"""R3 algebra: im2col patches against onnxruntime's Conv, weight <-> coefficient layouts, the ridge solve, the
held-out choice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.errors import PreconditionError
from graph_ops.least_squares import (
    PRODUCTS,
    LayerShape,
    PatchMoments,
    accumulate,
    choose_refit,
    coef_from_weights,
    conv_patches,
    gathered_rows,
    gathered_targets,
    patch_error,
    patch_index,
    patch_rows,
    sample_positions,
    solve_refit,
    weights_from_coef,
)
from tests.oracles import run_ort


def _layer(op: str, weight: np.ndarray, bias: np.ndarray | None, x_shape: list, **attrs: object) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"], name="layer", **attrs)], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CONVS = {
    "3x3-same": {"cin": 4, "cout": 6, "k": 3, "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1},
    "stride2-asym-pad": {"cin": 4, "cout": 6, "k": 3, "strides": [2, 2], "pads": [0, 1, 1, 0], "dilations": [1, 1], "group": 1},
    "dilated": {"cin": 3, "cout": 5, "k": 3, "strides": [1, 1], "pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 1},
    "grouped": {"cin": 8, "cout": 6, "k": 3, "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 2},
    "depthwise": {"cin": 5, "cout": 5, "k": 3, "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 5},
}


@pytest.mark.parametrize("case", CONVS.values(), ids=CONVS.keys())
def test_patches_times_coefficients_equal_onnxruntime_conv(case: dict, rng: np.random.Generator) -> None:
    cin, cout, k, group = case["cin"], case["cout"], case["k"], case["group"]
    weight = rng.standard_normal((cout, cin // group, k, k))
    bias = rng.standard_normal(cout)
    attrs = {key: case[key] for key in ("strides", "pads", "dilations", "group")}
    model = _layer("Conv", weight, bias, [2, cin, 9, 9], kernel_shape=[k, k], **attrs)
    x = rng.standard_normal((2, cin, 9, 9)).astype(np.float32)
    want = run_ort(model, {"x": x})[0]
    shape = LayerShape.of(model.graph.node[0], weight.shape)
    image, oy, ox = sample_positions(2, want.shape[2], want.shape[3], 7, rng)
    rows = patch_rows(conv_patches(x.astype(np.float64), shape, image, oy, ox), shape)
    coef = coef_from_weights(shape, weight, bias)
    got = np.einsum("rgd,gdo->rgo", rows, coef).reshape(len(image), cout)
    np.testing.assert_allclose(got, want[image, :, oy, ox], rtol=1e-4, atol=1e-4)


def _transposed_brute_force(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, strides: list, pads: list,
                            dilations: list, group: int, out_hw: tuple[int, int]) -> np.ndarray:
    """ConvTranspose by its definition: every input pixel scattered through every tap (numpy loops)."""
    n, c_in, h, w = x.shape
    out_g, kh, kw = weight.shape[1:]
    per = c_in // group
    y = np.zeros((n, out_g * group, *out_hw)) + bias[None, :, None, None]
    for c in range(c_in):
        g = c // per
        for i in range(h):
            for j in range(w):
                for u in range(kh):
                    for v in range(kw):
                        oy = i * strides[0] + u * dilations[0] - pads[0]
                        ox = j * strides[1] + v * dilations[1] - pads[1]
                        if 0 <= oy < out_hw[0] and 0 <= ox < out_hw[1]:
                            y[:, g * out_g:(g + 1) * out_g, oy, ox] += x[:, c, i, j, None] * weight[c, :, u, v]
    return y


TRANSPOSED = {
    "k2-s2": {"cin": 4, "cout": 6, "k": 2, "strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1},
    "k3-s2-pads-outpad": {"cin": 4, "cout": 5, "k": 3, "strides": [2, 2], "pads": [1, 0, 1, 1], "dilations": [1, 1],
                          "group": 1, "output_padding": [1, 1]},
    "k3-s1-dilated": {"cin": 3, "cout": 4, "k": 3, "strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [2, 2],
                      "group": 1},
    "grouped-s3": {"cin": 6, "cout": 4, "k": 3, "strides": [3, 2], "pads": [0, 1, 0, 1], "dilations": [1, 1],
                   "group": 2},
}


@pytest.mark.parametrize("case", TRANSPOSED.values(), ids=TRANSPOSED.keys())
def test_transposed_patches_times_coefficients_equal_onnxruntime_and_the_definition(
        case: dict, rng: np.random.Generator) -> None:
    """A ConvTranspose's output at sampled positions is its transposed patches times its coefficients: checked
    against onnxruntime and against a brute-force scatter of every input pixel (numpy loops)."""
    cin, cout, k, group = case["cin"], case["cout"], case["k"], case["group"]
    weight = rng.standard_normal((cin, cout // group, k, k))
    bias = rng.standard_normal(cout)
    attrs = {key: case[key] for key in ("strides", "pads", "dilations", "group", "output_padding") if key in case}
    model = _layer("ConvTranspose", weight, bias, [2, cin, 5, 6], kernel_shape=[k, k], **attrs)
    x = rng.standard_normal((2, cin, 5, 6)).astype(np.float32)
    want = run_ort(model, {"x": x})[0]
    brute = _transposed_brute_force(x.astype(np.float64), weight, bias, case["strides"], case["pads"],
                                    case["dilations"], group, want.shape[2:])
    np.testing.assert_allclose(brute, want, rtol=1e-4, atol=1e-4)
    shape = LayerShape.of(model.graph.node[0], weight.shape)
    assert shape.dim(weight.shape) == cin // group * k * k + 1
    image, oy, ox = sample_positions(2, want.shape[2], want.shape[3], None, rng)  # every position, every phase
    rows = patch_rows(conv_patches(x.astype(np.float64), shape, image, oy, ox), shape)
    got = np.einsum("rgd,gdo->rgo", rows, coef_from_weights(shape, weight, bias)).reshape(len(image), cout)
    np.testing.assert_allclose(got, brute[image, :, oy, ox], rtol=1e-9, atol=1e-9)


def test_transposed_gathered_taps_equal_the_patches(rng: np.random.Generator) -> None:
    """patch_index (what the in-graph gathers read) gives the same patches as conv_patches for a ConvTranspose."""
    case = TRANSPOSED["k3-s2-pads-outpad"]
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="t", kernel_shape=[3, 3],
                            **{key: case[key] for key in ("strides", "pads", "dilations", "output_padding")})
    shape = LayerShape.of(node, (4, 5, 3, 3))
    x = rng.standard_normal((3, 4, 5, 6))
    image, oy, ox = sample_positions(3, 10, 12, 9, rng)
    flat, inside = patch_index(shape, 5, 6, oy, ox)
    gathered = x.reshape(3, 4, -1)[image[:, None, None], np.arange(4)[None, :, None], flat[:, None, :]]
    gathered = (gathered * inside[:, None, :]).reshape(len(image), 1, -1)
    np.testing.assert_array_equal(gathered, conv_patches(x, shape, image, oy, ox))
    assert inside.any(axis=1).all() and not inside.all()  # every position is reached by some tap, not by all


@pytest.mark.parametrize(("op", "attrs", "w_shape", "with_bias"), [
    ("Conv", {"group": 3}, (6, 2, 3, 3), True),
    ("ConvTranspose", {"group": 2}, (6, 3, 2, 2), True),
    ("ConvTranspose", {}, (4, 3, 3, 3), False),
    ("Conv", {}, (4, 3, 1, 1), False),
    ("Gemm", {"transB": 1, "alpha": 0.5, "beta": 2.0}, (4, 7), True),
    ("Gemm", {}, (7, 4), True),
    ("MatMul", {}, (7, 4), False),
], ids=["grouped-conv", "grouped-conv-transpose", "conv-transpose-no-bias", "conv-no-bias", "gemm-transB-alpha-beta",
        "gemm", "matmul"])
def test_coefficients_round_trip_to_weights(op: str, attrs: dict, w_shape: tuple, with_bias: bool,
                                            rng: np.random.Generator) -> None:
    node = helper.make_node(op, ["x", "w", "b"] if with_bias else ["x", "w"], ["y"], name="n", **attrs)
    shape = LayerShape.of(node, w_shape)
    weight = rng.standard_normal(w_shape).astype(np.float32)
    out = {"Conv": w_shape[0], "ConvTranspose": w_shape[1] * attrs.get("group", 1)}.get(
        op, w_shape[0] if attrs.get("transB") else w_shape[1])
    bias = rng.standard_normal(out).astype(np.float32) if with_bias else None
    coef = coef_from_weights(shape, weight, bias)
    assert coef.shape[1] == shape.dim(w_shape)
    back_w, back_b = weights_from_coef(shape, coef, w_shape, np.dtype(np.float32))
    np.testing.assert_allclose(back_w, weight, rtol=1e-6)
    if op == "MatMul":
        assert back_b is None
    else:
        np.testing.assert_allclose(back_b, bias if with_bias else np.zeros(out), rtol=1e-6, atol=1e-7)


def test_gemm_coefficients_reproduce_onnxruntime(rng: np.random.Generator) -> None:
    weight, bias = rng.standard_normal((5, 7)), rng.standard_normal(5)
    model = _layer("Gemm", weight, bias, [6, 7], transB=1, alpha=0.5, beta=2.0)
    x = rng.standard_normal((6, 7)).astype(np.float32)
    shape = LayerShape.of(model.graph.node[0], weight.shape)
    rows = patch_rows(x.astype(np.float64)[:, None, :], shape)
    got = np.einsum("rgd,gdo->rgo", rows, coef_from_weights(shape, weight, bias))[:, 0]
    np.testing.assert_allclose(got, run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("op", "attrs", "reason"), [("Gemm", {"transA": 1}, "transA"),
                                                     ("Conv", {"auto_pad": "SAME_UPPER"}, "auto_pad"),
                                                     ("ConvTranspose", {"output_shape": [8, 8]}, "output_shape"),
                                                     ("Resize", {}, "not refit")],
                         ids=["gemm-transA", "auto-pad", "conv-transpose-output-shape", "not-a-layer"])
def test_unmodelled_layers_are_refused(op: str, attrs: dict, reason: str) -> None:
    node = helper.make_node(op, ["x", "w"], ["y"], name="n", **attrs)
    with pytest.raises(PreconditionError, match=reason):
        LayerShape.of(node, (4, 4, 3, 3) if "Conv" in op or op == "Resize" else (4, 4))


def _problem(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (n, 1, 6) with intercept, a true (1, 6, 3) coefficient, noisy targets."""
    x = rng.standard_normal((n, 1, 5))
    rows = patch_rows(x, LayerShape("Gemm"))
    coef = rng.standard_normal((1, 6, 3))
    y = np.einsum("rgd,gdo->rgo", rows, coef) + noise * rng.standard_normal((n, 1, 3))
    return rows, y, coef


def test_patch_error_matches_brute_force(rng: np.random.Generator) -> None:
    rows, y, _ = _problem(rng, 50, 0.3)
    coef = rng.standard_normal((1, 6, 3))
    brute = float(np.sum((y - np.einsum("rgd,gdo->rgo", rows, coef)) ** 2))
    assert patch_error(accumulate(rows, y, np.float64), coef) == pytest.approx(brute, rel=1e-9)  # the algebra


def test_streamed_moments_merge_to_the_one_shot_moments(rng: np.random.Generator) -> None:
    rows, y, _ = _problem(rng, 40, 0.3)
    # the algebra, in float64 products (float32 products differ in rounding with the split: test_float32_products_...)
    merged = accumulate(rows[:15], y[:15], np.float64).merge(accumulate(rows[15:], y[15:], np.float64))
    whole = accumulate(rows, y, np.float64)
    assert merged.count == whole.count == 40
    for a, b in ((merged.gram, whole.gram), (merged.cross, whole.cross), (merged.target_sq, whole.target_sq)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_exact_linear_targets_are_recovered(rng: np.random.Generator) -> None:
    rows, y, coef = _problem(rng, 200, 0.0)
    got = solve_refit(accumulate(rows, y), 1e-9, intercept=True)
    np.testing.assert_allclose(got, coef, rtol=1e-5, atol=1e-6)


def test_intercept_is_not_shrunk(rng: np.random.Generator) -> None:
    """A huge ridge shrinks the slopes to zero but the intercept still fits the target mean."""
    rows, y, _ = _problem(rng, 300, 0.1)
    got = solve_refit(accumulate(rows, y, np.float64), 1e9, intercept=True)  # the algebra: float64 products
    np.testing.assert_allclose(got[0, :-1], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[0, -1], y[:, 0].mean(axis=0), rtol=1e-6)


def test_choice_keeps_current_weights_when_the_refit_does_not_help(rng: np.random.Generator) -> None:
    rows, y, coef = _problem(rng, 100, 0.0)  # exact targets: an error of 0 needs float64 products
    fit, held = accumulate(rows[:20], y[:20], np.float64), accumulate(rows[20:], y[20:], np.float64)
    choice = choose_refit(fit, held, coef, intercept=True)
    assert choice.alpha is None and np.array_equal(choice.coef, coef)
    assert choice.error_before == choice.error_after == pytest.approx(0.0, abs=1e-12)


def test_choice_refits_and_lowers_the_held_out_error(rng: np.random.Generator) -> None:
    rows, y, coef = _problem(rng, 400, 0.2)
    fit, held = accumulate(rows[:300], y[:300]), accumulate(rows[300:], y[300:])
    current = coef + 0.5 * rng.standard_normal(coef.shape)
    choice = choose_refit(fit, held, current, intercept=True, alphas=(1e-4, 1e-1, 10.0))
    assert choice.alpha in (1e-4, 1e-1, 10.0)
    assert choice.error_after < 0.5 * choice.error_before
    assert isinstance(fit.merge(held), PatchMoments)


@pytest.mark.parametrize("group,intercept", [(1, True), (2, True), (4, False)])
def test_gathered_rows_and_targets_are_the_patch_layout_in_float32(group: int, intercept: bool) -> None:
    # gathered values (N, C, P * taps): per sample, P positions of `taps` values per channel
    rng = np.random.default_rng(0)
    n, channels, positions, taps = 3, 8, 5, 9
    values = rng.standard_normal((n, channels, positions * taps)).astype(np.float32)
    shape = LayerShape("Conv", group=group, kernel=(3, 3), intercept=intercept)
    rows = gathered_rows(values, shape, taps)
    # reference, written out: row (sample i, position p), group g = channels of g, each with its taps
    per = channels // group
    for i in range(n):
        for p in range(positions):
            for g in range(group):
                expect = [values[i, g * per + c, p * taps + t] for c in range(per) for t in range(taps)]
                expect += [1.0] if intercept else []
                np.testing.assert_array_equal(rows[i * positions + p, g], np.asarray(expect, np.float64))
    assert rows.dtype == PRODUCTS == np.float32 and rows.shape == (n * positions, group, per * taps + int(intercept))
    outputs = rng.standard_normal((n, 6, positions)).astype(np.float32)
    targets = gathered_targets(outputs, 2)
    assert targets.dtype == PRODUCTS and targets.shape == (n * positions, 2, 3)
    np.testing.assert_array_equal(targets[1 * positions + 4, 1], outputs[1, 3:6, 4])


def test_a_position_prior_is_blended_in_only_where_it_lowers_the_held_out_error(rng: np.random.Generator) -> None:
    """A pooled layer has few rows of its own (one per image); per-position rows of the same linear map are many.
    A faithful prior is chosen (weight > 0) and brings the coefficients closer to the truth than the rows alone;
    a misleading prior (another map) gets weight 0, which is exactly the refit without a prior."""
    from graph_ops.least_squares import with_prior

    coef = rng.standard_normal((1, 9, 3))
    own_x = patch_rows(rng.standard_normal((30, 1, 8)), LayerShape("Gemm"))
    own_y = np.einsum("rgd,gdo->rgo", own_x, coef) + 0.5 * rng.standard_normal((30, 1, 3))
    fit, held = accumulate(own_x[:20], own_y[:20]), accumulate(own_x[20:], own_y[20:])
    pos_x = patch_rows(rng.standard_normal((2000, 1, 8)), LayerShape("Gemm"))
    current = np.zeros((1, 9, 3))
    plain = choose_refit(fit, held, current, True)
    faithful = (accumulate(pos_x[:1500], np.einsum("rgd,gdo->rgo", pos_x[:1500], coef)),
                accumulate(pos_x[1500:], np.einsum("rgd,gdo->rgo", pos_x[1500:], coef)))
    blended = choose_refit(fit, held, current, True, prior=faithful)
    assert blended.prior_weight > 0 and blended.error_after < plain.error_after
    assert np.sum((blended.coef - coef) ** 2) < np.sum((plain.coef - coef) ** 2)
    other = rng.standard_normal((1, 9, 3))
    misleading = tuple(accumulate(x, np.einsum("rgd,gdo->rgo", x, other)) for x in (pos_x[:1500], pos_x[1500:]))
    refused = choose_refit(fit, held, current, True, prior=misleading)
    assert refused.prior_weight == 0.0 and np.array_equal(refused.coef, plain.coef)
    assert with_prior(fit, faithful[0], 0.0) is fit
    scaled = with_prior(fit, faithful[0], 1.0)  # the prior's 1,500 rows weigh as much as the fit's 20
    np.testing.assert_allclose(scaled.gram - fit.gram, faithful[0].gram * 20 / 1500)


def _offset_rows(rng: np.random.Generator, n: int, features: int, offset: float) -> np.ndarray:
    """Correlated post-ReLU-like float32 rows ``(n, 1, features + 1)`` (intercept) whose mean is ``offset`` times
    their spread: the case where raw float32 products lose the centred information."""
    x = np.maximum(rng.standard_normal((n, features)) + offset, 0)
    x = x @ (np.eye(features) + 0.3 * rng.standard_normal((features, features)) / np.sqrt(features))
    return patch_rows(x.astype(np.float32)[:, None], LayerShape("Gemm"))


def test_float32_products_match_float64_within_their_rounding(rng: np.random.Generator) -> None:
    """Entries within sqrt(R) 2^-24 sqrt(G_ii G_jj) (measured: under 0.1 of it), and the ridge solve at the smallest
    alpha within 1e-3 of the float64 one even with an offset of 10 spreads (raw float32 products of the same rows:
    a relative coefficient difference of order 1)."""
    rows = _offset_rows(rng, 2048, 144, 10.0)
    y = (np.einsum("rgd,gdo->rgo", rows.astype(np.float64), rng.standard_normal((1, 145, 8)))
         + 0.1 * rng.standard_normal((2048, 1, 8))).astype(np.float32)
    single, double = accumulate(rows, y), accumulate(rows, y, np.float64)
    scale = np.sqrt(np.diagonal(double.gram[0]))
    bound = np.sqrt(len(rows)) * 2.0**-24
    assert np.all(np.abs(single.gram[0] - double.gram[0]) <= bound * np.outer(scale, scale))
    assert np.all(np.abs(single.cross[0] - double.cross[0]) <= bound * np.outer(scale, np.sqrt(double.target_sq[0])))
    want = solve_refit(double, 1e-4, intercept=True)
    assert np.abs(solve_refit(single, 1e-4, intercept=True) - want).max() <= 1e-3 * np.abs(want).max()
    x = rows[:, 0]
    raw = PatchMoments(len(rows), (x.T @ x).astype(np.float64)[None], single.cross, single.target_sq)
    assert np.abs(solve_refit(raw, 1e-4, intercept=True) - want).max() > 1e-2 * np.abs(want).max()


def test_products_are_float64_where_float32_overflows(rng: np.random.Generator) -> None:
    rows = np.concatenate([1e20 * rng.standard_normal((8, 1, 3)), np.ones((8, 1, 1))], axis=2)
    got = accumulate(rows, rows[:, :, :2])
    want = accumulate(rows, rows[:, :, :2], np.float64)
    assert np.isfinite(got.gram).all()
    np.testing.assert_allclose(got.gram, want.gram, rtol=1e-12)
    np.testing.assert_allclose(got.cross, want.cross, rtol=1e-12)
