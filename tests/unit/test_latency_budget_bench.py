"""Pure helpers of the latency-budget benchmark (``benchmarks/latency_budget.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.latency_budget import _torchvision_key, mcnemar


def test_mcnemar_counts_the_digits_only_one_model_gets_right() -> None:
    a = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0], bool)
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (5, 3)
    # exact two-sided binomial: 2 * P(X <= 3), X ~ Bin(8, 1/2) = 2 * 93 / 256
    assert result["p"] == pytest.approx(round(2 * 93 / 256, 4))
    assert mcnemar(b, a)["p"] == result["p"]


@pytest.mark.parametrize(("only_a", "only_b", "p"), [(0, 0, 1.0), (10, 0, 2 / 1024), (4, 4, 1.0)])
def test_mcnemar_edge_cases(only_a: int, only_b: int, p: float) -> None:
    a = np.array([True] * only_a + [False] * only_b + [True] * 3)
    b = np.array([False] * only_a + [True] * only_b + [True] * 3)
    assert mcnemar(a, b)["p"] == pytest.approx(round(min(1.0, p), 4))
    assert math.isfinite(mcnemar(a, b)["p"])


def test_torchvision_results_keep_batch_one_where_they_were() -> None:
    assert _torchvision_key(1) == "torchvision"
    assert _torchvision_key(32) == "torchvision-batch32"
