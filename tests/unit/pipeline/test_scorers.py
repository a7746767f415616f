"""Scorers on synthetic statistics: exact DI algebra, greedy elimination, planted-channel recovery, I/O."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from graph_ops.groups import ChannelGroup, ChannelGroupIndex, Segment
from pipeline.calibration.stats import CalibrationStats, ProbeStats
from pipeline.errors import UserInputError
from pipeline.selection.scorers import SCORERS, ChannelScores, ScoringContext
from pipeline.selection.scorers.di import Eliminator, eliminate, ridge
from pipeline.selection.scorers.pls import standardised_moments, vip


def _stats(x: np.ndarray, y: np.ndarray, cells: int, classes: int, raw: np.ndarray | None = None) -> ProbeStats:
    return ProbeStats.empty(x.shape[1] // cells, cells, classes).update(x, y, raw)


def _random_stats(seed: int, channels: int, cells: int, classes: int = 4, n: int = 200) -> ProbeStats:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    mix = rng.normal(size=(channels * cells, channels * cells)) * 0.3 + np.eye(channels * cells)
    x = rng.normal(size=(n, channels * cells)) @ mix + 0.4 * rng.normal(size=(classes, channels * cells))[y]
    return _stats(x, y, cells, classes)


def _brute_di(stats: ProbeStats, keep_features: np.ndarray, rho: float) -> float:
    s, d = stats.scatter(), stats.delta()
    a = s[np.ix_(keep_features, keep_features)] + rho * np.eye(len(keep_features))
    return float(np.sum(d[keep_features] * np.linalg.solve(a, d[keep_features])))


@pytest.mark.parametrize(("cells", "classes"), [(1, 4), (4, 4), (1, 2), (4, 12)],
                         ids=["gap-G", "block4-Q", "gap-Q", "block4-G"])
def test_fast_drop_equals_brute_force(cells: int, classes: int) -> None:
    stats = _random_stats(0, channels=10, cells=cells, classes=classes)
    blocks = np.arange(10 * cells).reshape(10, cells)
    rho = ridge(stats.scatter(), 1e-3)
    full = _brute_di(stats, blocks.reshape(-1), rho)
    drops = Eliminator(stats, blocks).drops()
    brute = [full - _brute_di(stats, np.delete(blocks, c, axis=0).reshape(-1), rho) for c in range(10)]
    np.testing.assert_allclose(drops, brute, rtol=1e-9)


@pytest.mark.parametrize(("cells", "flush", "classes"), [(1, 3, 4), (2, 2, 4), (1, 0, 2), (2, 3, 5)],
                         ids=["gap-fold3-G", "block2-fold2-Q", "gap-auto-Q", "block2-fold3-G"])
def test_greedy_downdates_equal_recomputation(cells: int, flush: int, classes: int) -> None:
    stats = _random_stats(1, channels=9, cells=cells, classes=classes)
    assert Eliminator(stats, np.arange(9 * cells).reshape(9, cells)).q_mode == (4 * classes <= 9 * cells)
    blocks = np.arange(9 * cells).reshape(9, cells)
    rho = ridge(stats.scatter(), 1e-3)
    full = _brute_di(stats, blocks.reshape(-1), rho)
    result = eliminate([Eliminator(stats, blocks, flush=flush)])
    alive = list(range(9))
    for step, channel in enumerate(result.order):
        current = _brute_di(stats, blocks[alive].reshape(-1), rho)
        brute_drops = [current - (_brute_di(stats, blocks[[a for a in alive if a != c]].reshape(-1), rho)
                                  if len(alive) > 1 else 0.0) for c in alive]
        assert alive[int(np.argmin(brute_drops))] == channel
        alive.remove(channel)
        remaining = _brute_di(stats, blocks[alive].reshape(-1), rho) if alive else 0.0
        assert result.retention[8 - step] == pytest.approx(remaining / full, rel=1e-9, abs=1e-12)
    assert result.retention[-1] == 1.0 and result.retention[0] == 0.0
    assert np.all(np.diff(result.retention) >= 0)


def _index(groups: list[tuple[str, int]], probes: dict[str, list[tuple[str, int]]]) -> ChannelGroupIndex:
    """Groups (id, size) and, per probe tensor, its (group id, offset) segments (each whole group)."""
    sizes = dict(groups)
    by_tensor = {p: tuple(Segment(g, off, 0, sizes[g]) for g, off in segs) for p, segs in probes.items()}
    members = {g: tuple(p for p, segs in probes.items() if any(s[0] == g for s in segs)) for g in sizes}
    return ChannelGroupIndex(
        groups=tuple(ChannelGroup(id=g, size=s, producers=(f"conv_{g}",), consumers=(), probes=members[g])
                     for g, s in groups), by_tensor=by_tensor)


def _planted(seed: int, channels: int = 16, planted: int = 5, classes: int = 4, n: int = 240):
    """Noise channels of random scale plus one channel whose mean depends on the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    raw = rng.normal(size=(n, channels, 2, 2)) * rng.uniform(0.5, 3.0, size=channels)[None, :, None, None]
    raw[:, planted] += 1.2 * np.arange(classes)[y][:, None, None]
    raw = np.maximum(raw + 1.0, 0.0)
    return raw.mean(axis=(2, 3)), y, raw


def _context(x, y, raw, seed: int) -> ScoringContext:
    stats = CalibrationStats("0" * 64, "synthetic", "gap", 4, {"t": _stats(x, y, 1, 4, raw)})
    index = _index([("g", x.shape[1])], {"t": [("g", 0)]})
    weights = {"w": np.random.default_rng(seed + 100).normal(size=(x.shape[1], 3, 3, 3))}
    return ScoringContext(index=index, stats=stats, weights=weights, seed=seed,
                          producer_weights={"conv_g": ("w", 0)})


def _top_rate(method: str, seeds: range) -> float:
    hits = 0
    for seed in seeds:
        scores = SCORERS[method](_context(*_planted(seed), seed=seed)).scores["g"]
        hits += int(np.argmax(scores) == 5)
    return hits / len(seeds)


@pytest.mark.parametrize("method", ["di", "lda", "pls-vip"], ids=str)
def test_discriminant_scorers_find_the_planted_channel(method: str) -> None:
    assert _top_rate(method, range(20)) == 1.0


@pytest.mark.parametrize("method", ["random", "l2", "l1"], ids=str)
def test_label_free_baselines_do_not(method: str) -> None:
    assert _top_rate(method, range(20)) <= 0.4


def test_concat_and_residual_views_pick_the_right_features() -> None:
    x, y, raw = _planted(3, channels=10, planted=6)  # tensor "cat" = [group a (4) | group b (6)]
    cat = _stats(x, y, 1, 4, raw)
    residual = _stats(x[:, 4:], y, 1, 4, raw[:, 4:])  # group b also read alone at "res"
    stats = CalibrationStats("0" * 64, "s", "gap", 4, {"cat": cat, "res": residual})
    index = _index([("a", 4), ("b", 6)], {"cat": [("a", 0), ("b", 4)], "res": [("b", 0)]})
    for method in ("di", "lda", "pls-vip", "mean-act"):
        scores = SCORERS[method](ScoringContext(index=index, stats=stats))
        assert scores.scores["b"].shape == (6,) and scores.scores["a"].shape == (4,)
        if method != "mean-act":
            assert int(np.argmax(scores.scores["b"])) == 2, method


def test_di_scores_follow_the_elimination_order() -> None:
    scores = SCORERS["di"](_context(*_planted(4), seed=4))
    order, rank = scores.order["g"], scores.scores["g"]
    assert np.all(np.diff(rank[order]) > 0)
    assert scores.retention["g"].shape == (17,) and scores.retention["g"][-1] == 1.0


def test_activation_scorers_rank_a_dead_channel_last() -> None:
    x, y, raw = _planted(5)
    raw[:, 9] = 0.0
    x[:, 9] = 0.0
    ctx = _context(x, y, raw, seed=5)
    for method in ("apoz", "mean-act", "di"):
        assert int(np.argmin(SCORERS[method](ctx).scores["g"])) == 9, method


def _nipals_vip(x: np.ndarray, y_onehot: np.ndarray, components: int) -> np.ndarray:
    """Reference PLS2 NIPALS (as scikit-learn, scale=True) on per-sample data, then VIP."""
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    ys = (y_onehot - y_onehot.mean(0)) / y_onehot.std(0, ddof=1)
    ws, ts, qs = [], [], []
    for _ in range(components):
        u = ys[:, 0].copy()
        for _ in range(500):
            w = xs.T @ u
            w /= np.linalg.norm(w)
            t = xs @ w
            c = ys.T @ t / (t @ t)
            u_new = ys @ c / (c @ c)
            if np.linalg.norm(u_new - u) < 1e-13:
                break
            u = u_new
        p = xs.T @ t / (t @ t)
        q = ys.T @ t / (t @ t)
        xs, ys = xs - np.outer(t, p), ys - np.outer(t, q)
        ws.append(w), ts.append(t), qs.append(q)
    ss = np.array([(t @ t) * (q @ q) for t, q in zip(ts, qs, strict=True)])
    wn = np.stack(ws, 1) / np.linalg.norm(np.stack(ws, 1), axis=0)
    return np.sqrt(x.shape[1] * (wn**2 @ ss) / ss.sum())


def test_pls_vip_from_statistics_equals_nipals_on_samples() -> None:
    x, y, _ = _planted(6, channels=8)
    expected = _nipals_vip(x, np.eye(4)[y], 2)
    got = vip(*standardised_moments(_stats(x, y, 1, 4)), 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.sum(got**2) == pytest.approx(8.0)


def test_scores_json_round_trip() -> None:
    scores = SCORERS["di"](_context(*_planted(7), seed=7))
    loaded, path = ChannelScores.from_json(scores.to_json(model_path="/m.onnx"))
    assert path == "/m.onnx" and loaded.method == "di" and loaded.model_sha256 == scores.model_sha256
    np.testing.assert_array_equal(loaded.scores["g"], scores.scores["g"])
    np.testing.assert_array_equal(loaded.order["g"], scores.order["g"])
    np.testing.assert_array_equal(loaded.retention["g"], scores.retention["g"])


@pytest.mark.parametrize("text", ["{", '{"format": "x"}', '{"format": "diprune.scores/1"}'],
                         ids=["not-json", "wrong-format", "missing-fields"])
def test_scores_json_errors(text: str) -> None:
    with pytest.raises(UserInputError):
        ChannelScores.from_json(text)


@pytest.mark.parametrize("method", sorted(m for m, s in SCORERS.items() if s.requires_stats), ids=str)
def test_statistics_scorers_need_statistics(method: str) -> None:
    ctx = ScoringContext(index=_index([("g", 4)], {"t": [("g", 0)]}))
    with pytest.raises(UserInputError, match="needs calibration statistics"):
        SCORERS[method](ctx)


def test_norm_scorers_need_producer_weights() -> None:
    ctx = ScoringContext(index=_index([("g", 4)], {"t": [("g", 0)]}))
    with pytest.raises(UserInputError, match="producer_weights"):
        SCORERS["l1"](ctx)


def test_random_is_seeded() -> None:
    ctx = _context(*_planted(8), seed=3)
    first, again = SCORERS["random"](ctx).scores["g"], SCORERS["random"](ctx).scores["g"]
    other = SCORERS["random"](ScoringContext(index=ctx.index, seed=4)).scores["g"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_split_segments_map_tensor_channels_to_group_channels() -> None:
    x, y, raw = _planted(9, channels=6, planted=1)  # tensor = group channels [3, 4, 5, 0, 1, 2]
    stats = CalibrationStats("0" * 64, "s", "gap", 4, {"t": _stats(x, y, 1, 4, raw)})
    index = ChannelGroupIndex(groups=(ChannelGroup(id="g", size=6, producers=("c",), consumers=(), probes=("t",)),),
                              by_tensor={"t": (Segment("g", 0, 3, 3), Segment("g", 3, 0, 3))})
    for method in ("di", "lda", "pls-vip"):
        assert int(np.argmax(SCORERS[method](ScoringContext(index=index, stats=stats)).scores["g"])) == 4, method


@pytest.mark.parametrize("method", ["di", "lda", "pls-vip"], ids=str)
def test_pooled_cells_are_scored_per_channel(method: str) -> None:
    rng = np.random.default_rng(10)
    y = rng.integers(0, 4, 300)
    x = rng.normal(size=(300, 8, 4)) * rng.uniform(0.5, 2.0, size=(1, 8, 1))
    x[:, 3, 2] += 1.5 * y  # one cell of channel 3 carries the class
    stats = CalibrationStats("0" * 64, "s", "avg2", 4, {"t": _stats(x.reshape(300, 32), y, 4, 4)})
    index = _index([("g", 8)], {"t": [("g", 0)]})
    scores = SCORERS[method](ScoringContext(index=index, stats=stats)).scores["g"]
    assert scores.shape == (8,) and int(np.argmax(scores)) == 3


def test_di_without_class_information_is_uninformative_not_an_error() -> None:
    x, _, raw = _planted(11, channels=8)
    y = np.zeros(len(x), dtype=np.int64)  # one class: S_B = 0
    stats = CalibrationStats("0" * 64, "s", "gap", 4, {"t": _stats(x, y, 1, 4, raw)})
    scores = SCORERS["di"](ScoringContext(index=_index([("g", 8)], {"t": [("g", 0)]}), stats=stats))
    np.testing.assert_array_equal(scores.order["g"], np.arange(8))
    np.testing.assert_allclose(scores.retention["g"], np.arange(9) / 8)


def test_lda_trace_follows_utility_that_reaches_the_decision() -> None:
    """x(6) -> Gemm A (identity) -> Relu -> Gemm H (4) -> Relu -> classifier. Inputs 0 and 1 both carry the
    class, but H reads channel 1 of A with zero weight: layer-local LDA ranks A's channel 1 high, the traced
    utility of the pre-decision layer (lda-trace) gives it nothing and ranks channel 0 first."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.calibration.calibrate import calibrate
    from pipeline.data.datasets import from_iterable
    from pipeline.model.prepare import prepare
    from pipeline.prune.orchestrate import score

    rng = np.random.default_rng(0)
    w_h = np.zeros((4, 6), np.float32)
    w_h[0, 0], w_h[1, 2], w_h[2, 3], w_h[3, 4:] = 1.0, 1.0, 1.0, 0.5
    inits = {"wa": np.eye(6, dtype=np.float32), "ba": np.full(6, 3.0, np.float32), "wh": w_h,
             "bh": np.full(4, 0.5, np.float32), "wc": rng.standard_normal((3, 4)).astype(np.float32),
             "bc": np.zeros(3, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "wa", "ba"], ["a"], name="A", transB=1),
             helper.make_node("Relu", ["a"], ["ar"], name="ra"),
             helper.make_node("Gemm", ["ar", "wh", "bh"], ["h"], name="H", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="rh"),
             helper.make_node("Gemm", ["hr", "wc", "bc"], ["logits"], name="C", transB=1)]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = Path(tempfile.mkdtemp()) / "planted.onnx"
    onnx.save(model, str(path))
    y = np.arange(900) % 3
    x = rng.standard_normal((900, 6)).astype(np.float32) * 0.3
    x[:, 0] += y
    x[:, 1] += y
    prepared = prepare(path)
    stats = calibrate(prepared, from_iterable([(x, y)]), progress=False)
    traced = score(prepared, stats, "lda-trace").scores
    local = score(prepared, stats, "lda").scores
    group = next(g for g in prepared.index.groups if g.size == 6 and g.prunable).id
    assert int(np.argmax(traced[group])) == 0 and traced[group][1] == 0.0
    assert local[group][1] > 10 * np.median(local[group])  # the layer-local criterion keeps the unused channel


def _near_constant(rng: np.random.Generator, n: int, d: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 4
    signal = rng.standard_normal((4, d))[labels]
    return 0.08 + spread * (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / 10 + signal), labels


def test_di_ridge_covers_the_rounding_noise_of_near_constant_features(caplog: pytest.LogCaptureFixture) -> None:
    """Features whose mean is 1e5-1e7 times their spread (near-dead channels, found on timm lcnet_050 and
    ese_vovnet19b_dw with random weights): S = G - n mu mu^T carries rounding noise beyond eps * tr(S)/d and used to
    fail the Cholesky ("not positive definite"). The ridge floors at d * machine eps * max G_ii, and a scatter that
    is still indefinite gets a larger ridge with a warning; ordinary features keep exactly the ridge they had."""
    from pipeline.calibration.stats import ProbeStats

    rng = np.random.default_rng(0)
    n, d = 400, 96
    floor = ProbeStats.empty(d, 1, 4).update(*_near_constant(rng, n, d, 1e-7))
    assert ridge(floor.scatter(), 1e-3, floor.gram) > 5 * ridge(floor.scatter(), 1e-3)
    stats = ProbeStats.empty(d, 1, 4).update(*_near_constant(rng, n, d, 1e-8))
    s = stats.scatter()
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(s + ridge(s, 1e-3) * np.eye(d))  # the ridge without a floor
    with caplog.at_level("WARNING", logger="pipeline.selection.scorers.di"):
        result = eliminate([Eliminator(stats, np.arange(d)[:, None])])
    assert "indefinite by rounding" in caplog.text
    assert sorted(result.order) == list(range(d)) and np.all(np.diff(result.retention) >= 0)
    labels = np.arange(n) % 4
    ordinary = ProbeStats.empty(d, 1, 4).update(rng.standard_normal((n, d)) + rng.standard_normal((4, d))[labels],
                                                labels)
    assert ridge(ordinary.scatter(), 1e-3, ordinary.gram) == ridge(ordinary.scatter(), 1e-3)
