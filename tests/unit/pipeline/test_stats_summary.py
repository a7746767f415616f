"""ChannelSummary: the one per-channel reduction shared by ``ProbeStats.update(raw=...)`` and calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration.stats import ChannelSummary, ProbeStats
from pipeline.errors import CalibrationError


def _batch(signed: bool, shape: tuple[int, ...] = (6, 4, 5, 3)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    raw = rng.standard_normal(shape).astype(np.float32)
    raw[raw < -0.4] = 0.0
    if not signed:
        raw = np.abs(raw)
    features = raw.reshape(shape[0], shape[1], -1).mean(axis=2, dtype=np.float64)
    return features, rng.integers(0, 3, shape[0]), raw


@pytest.mark.parametrize("signed", [False, True], ids=["post-relu", "signed"])
def test_summary_equals_numpy(signed: bool) -> None:
    _, _, raw = _batch(signed)
    sums, summary = ChannelSummary.of(raw)
    wide = raw.astype(np.float64)
    np.testing.assert_allclose(sums, wide.sum(axis=(2, 3)), rtol=1e-12)
    np.testing.assert_array_equal(summary.zeros, (raw == 0).sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(summary.abs_sum, np.abs(wide).sum(axis=(0, 2, 3)), rtol=1e-12)
    assert summary.elements == 6 * 5 * 3 and not summary.zeros.flags.writeable


@pytest.mark.parametrize("signed", [False, True], ids=["post-relu", "signed"])
def test_update_raw_and_summary_are_identical(signed: bool) -> None:
    x, y, raw = _batch(signed)
    empty = ProbeStats.empty(4, 1, 3)
    by_raw = empty.update(x, y, raw).update(x, y, raw)
    summary = ChannelSummary.of(raw)[1]
    by_summary = empty.update(x, y, summary=summary).update(x, y, summary=summary)
    for name in ("zeros", "abs_sum", "gram", "sum"):
        np.testing.assert_array_equal(getattr(by_raw, name), getattr(by_summary, name))
    assert by_raw.elements == by_summary.elements == 2 * 6 * 15
    assert by_raw.zeros.sum() > 0


def test_update_without_raw_keeps_channel_fields() -> None:
    x, y, _ = _batch(True)
    stats = ProbeStats.empty(4, 1, 3).update(x, y)
    assert stats.elements == 0 and not stats.zeros.any() and not stats.abs_sum.any() and stats.n == 6


@pytest.mark.parametrize("case", ["both", "wrong-channels", "bad-summary"])
def test_update_rejects_inconsistent_summaries(case: str) -> None:
    x, y, raw = _batch(True)
    with pytest.raises(CalibrationError):
        if case == "both":
            ProbeStats.empty(4, 1, 3).update(x, y, raw, summary=ChannelSummary.of(raw)[1])
        elif case == "wrong-channels":
            ProbeStats.empty(4, 1, 3).update(x, y, summary=ChannelSummary(np.zeros(5), np.zeros(5), 10))
        else:
            ChannelSummary(np.zeros(4), np.zeros(3), 10)
