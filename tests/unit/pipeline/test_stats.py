"""Sufficient statistics: streaming equals one-shot numpy, merge is exact, files round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.calibration.stats import CalibrationStats, ProbeStats
from pipeline.errors import CalibrationError, UserInputError


def _data(seed: int, n: int = 120, channels: int = 5, cells: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    raw = np.maximum(rng.normal(size=(n, channels, 4, 4)), 0.0)
    pooled = raw.reshape(n, channels, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(n, channels * cells)
    labels = rng.integers(0, classes, n)
    return pooled, labels, raw


def _stream(features, labels, raw, batch: int, cells: int = 4, classes: int = 3) -> ProbeStats:
    stats = ProbeStats.empty(raw.shape[1], cells, classes)
    for start in range(0, len(labels), batch):
        stop = start + batch
        stats = stats.update(features[start:stop], labels[start:stop], raw[start:stop])
    return stats


@pytest.mark.parametrize("batch", [1, 7, 120], ids=["b1", "b7", "one-shot"])
def test_streamed_updates_equal_one_shot_numpy(batch: int) -> None:
    x, y, raw = _data(0)
    stats = _stream(x, y, raw, batch)
    mu = x.mean(axis=0)
    centred = x - mu
    np.testing.assert_allclose(stats.scatter(), centred.T @ centred, rtol=1e-10, atol=1e-10)
    between = sum(np.sum(y == k) * np.outer(x[y == k].mean(0) - mu, x[y == k].mean(0) - mu) for k in range(3))
    np.testing.assert_allclose(stats.between(), between, rtol=1e-10, atol=1e-12)
    within = sum((x[y == k] - x[y == k].mean(0)).T @ (x[y == k] - x[y == k].mean(0)) for k in range(3))
    np.testing.assert_allclose(stats.within(), within, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(stats.zeros, (raw == 0).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats.abs_sum, np.abs(raw).sum(axis=(0, 2, 3)))
    assert stats.n == 120 and stats.elements == 120 * 16
    np.testing.assert_array_equal(stats.class_counts, np.bincount(y, minlength=3))


def test_merge_is_associative_and_order_independent() -> None:
    parts = [_stream(*_data(seed, n=40), batch=40) for seed in range(3)]
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[2].merge(parts[0].merge(parts[1]))
    for name in ("sum", "class_sums", "gram", "zeros", "abs_sum", "class_counts"):
        np.testing.assert_allclose(getattr(left, name), getattr(right, name), rtol=1e-13)
    assert left.n == right.n == 120 and left.elements == right.elements


def test_merge_rejects_other_shapes() -> None:
    with pytest.raises(CalibrationError, match="different shapes"):
        ProbeStats.empty(4, 1, 3).merge(ProbeStats.empty(5, 1, 3))


def test_arrays_are_read_only() -> None:
    stats = _stream(*_data(1), batch=60)
    with pytest.raises(ValueError, match="read-only"):
        stats.gram[0, 0] = 1.0


@pytest.mark.parametrize("bad", ["labels", "nan"], ids=["label-out-of-range", "nan-features"])
def test_update_rejects_bad_batches(bad: str) -> None:
    x, y, raw = _data(2, n=10)
    if bad == "labels":
        y = y + 5
    else:
        x[0, 0] = np.nan
    with pytest.raises(CalibrationError):
        ProbeStats.empty(5, 4, 3).update(x, y, raw)


def _calibration(seed: int) -> CalibrationStats:
    x, y, raw = _data(seed, n=30)
    return CalibrationStats(model_sha256="ab" * 32, dataset="synthetic", pooling="avg2", num_classes=3,
                            probes={"relu_2": _stream(x, y, raw, 30), "relu_1": _stream(x, y, raw, 10)})


def test_calibration_file_round_trip(tmp_path: Path) -> None:
    stats = _calibration(3)
    loaded = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    assert (loaded.model_sha256, loaded.pooling, loaded.num_classes) == (stats.model_sha256, "avg2", 3)
    assert list(loaded.probes) == ["relu_1", "relu_2"]
    for name, probe in stats.probes.items():
        np.testing.assert_array_equal(loaded.probes[name].gram, probe.gram)
        assert (loaded.probes[name].n, loaded.probes[name].cells) == (probe.n, probe.cells)


def test_calibration_merge_doubles_counts() -> None:
    merged = _calibration(4).merge(_calibration(4))
    assert merged.probes["relu_1"].n == 60


@pytest.mark.parametrize("content", [None, b"not a zip", b"PK\x03\x04garbage"], ids=["missing", "text", "bad-zip"])
def test_load_errors_are_clear(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "s.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match=r"not found|not a readable"):
        CalibrationStats.load(path)


def test_load_rejects_foreign_npz(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, __header__=np.array('{"format": "other/1"}'))
    with pytest.raises(UserInputError, match="not a DIPrune statistics file"):
        CalibrationStats.load(path)


def test_sparse_class_rows_give_the_dense_statistics_and_merge_by_union() -> None:
    from pipeline.calibration.stats import ProbeAccumulator

    rng = np.random.default_rng(3)
    x = rng.standard_normal((90, 6))
    y = rng.choice([2, 17, 40, 41], 90)
    dense, sparse = ProbeAccumulator(6, 1, 50), ProbeAccumulator(6, 1, 50, sparse=True)
    for part in np.array_split(np.arange(90), 4):
        dense.add(x[part], y[part])
        sparse.add(x[part], y[part])
    a, b = dense.freeze(), sparse.freeze()
    assert a.class_ids is None and b.class_ids.tolist() == [2, 17, 40, 41]
    np.testing.assert_array_equal(b.class_sums, a.class_sums[[2, 17, 40, 41]])
    np.testing.assert_array_equal(b.delta(), a.delta()[:, [2, 17, 40, 41]])
    np.testing.assert_array_equal(a.gram, b.gram)
    left = ProbeAccumulator(6, 1, 50, sparse=True)
    left.add(x[:30], np.full(30, 5))
    merged = left.freeze().merge(b)  # classes {5} and {2, 17, 40, 41}: the union, sorted
    assert merged.class_ids.tolist() == [2, 5, 17, 40, 41] and merged.n == 120
    np.testing.assert_allclose(merged.class_sums[1], x[:30].sum(axis=0))
    updated = b.update(x[:30], np.full(30, 5))
    np.testing.assert_array_equal(updated.class_ids, merged.class_ids)
    np.testing.assert_allclose(updated.gram, merged.gram)


def test_weighted_rows_count_as_repeated_samples() -> None:
    from pipeline.calibration.stats import ProbeAccumulator

    rng = np.random.default_rng(4)
    x, y, w = rng.standard_normal((5, 3)), np.array([0, 1, 1, 2, 0]), np.array([1, 3, 2, 1, 4])
    weighted, repeated = ProbeAccumulator(3, 1, 3), ProbeAccumulator(3, 1, 3)
    weighted.add(x, y, weights=w)
    repeated.add(np.repeat(x, w, axis=0), np.repeat(y, w))
    a, b = weighted.freeze(), repeated.freeze()
    assert a.n == b.n == 11 and a.class_counts.tolist() == b.class_counts.tolist() == [5, 5, 1]
    for field in ("sum", "class_sums", "gram"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-12)
