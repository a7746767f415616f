"""DI elimination without the up-front Cholesky: the elimination's own pivots certify the inverse (issue 30)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration.stats import ProbeStats
from pipeline.selection.scorers.di import Eliminator, _PivotError, eliminate


def _stats(seed: int, channels: int, cells: int, classes: int, n: int = 300) -> ProbeStats:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    d = channels * cells
    x = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) * 0.3 + np.eye(d)) + rng.normal(size=(classes, d))[y]
    return ProbeStats.empty(channels, cells, classes).update(x, y)


@pytest.mark.parametrize(("cells", "classes"), [(1, 4), (3, 4), (1, 30), (3, 12)])
def test_uncertified_elimination_equals_certified_bit_for_bit(cells: int, classes: int) -> None:
    stats = _stats(cells + classes, channels=12, cells=cells, classes=classes)
    blocks = np.arange(12 * cells).reshape(12, cells)
    fast, slow = Eliminator(stats, blocks), Eliminator(stats, blocks, certified=True)
    assert fast.checking and not slow.checking
    assert np.array_equal(fast.m, slow.m)
    a, b = eliminate([fast]), eliminate([slow])
    assert np.array_equal(a.order, b.order) and np.array_equal(a.retention, b.retention)
    assert np.array_equal(a.drops, b.drops)


def test_blocks_not_covering_every_feature_are_certified_up_front() -> None:
    stats = _stats(0, channels=6, cells=1, classes=3)
    assert not Eliminator(stats, np.arange(5).reshape(5, 1)).checking


@pytest.mark.parametrize("cells", [1, 2])
def test_a_failed_pivot_restarts_from_certified_eliminators(cells: int) -> None:
    stats = _stats(1, channels=8, cells=cells, classes=4)
    blocks = np.arange(8 * cells).reshape(8, cells)
    reference = eliminate([Eliminator(stats, blocks, certified=True)])
    broken = Eliminator(stats, blocks)
    broken.m = -broken.m  # an indefinite "inverse": the first pivot fails
    broken._mb = -broken._mb
    with pytest.raises(_PivotError):
        broken.remove(0)
    broken = Eliminator(stats, blocks)
    broken.m, broken._mb = -broken.m, -broken._mb
    result = eliminate([broken, Eliminator(stats, blocks)])
    joint = eliminate([Eliminator(stats, blocks, certified=True), Eliminator(stats, blocks, certified=True)])
    assert np.array_equal(result.order, joint.order) and np.array_equal(result.retention, joint.retention)
    assert sorted(reference.order) == list(range(8))
