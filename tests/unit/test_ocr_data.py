"""The rendered OCR benchmark data (benchmarks/ocr_data.py): deterministic, in the models' layouts."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL", reason="Pillow renders the OCR benchmark data")

from benchmarks.ocr_data import FONT_DIR, ctc_greedy, make_cls, make_det

pytestmark = pytest.mark.skipif(not FONT_DIR.is_dir(), reason=f"no DejaVu fonts in {FONT_DIR}")


def test_cls_lines_are_deterministic_and_balanced() -> None:
    x, y = make_cls(6, seed=3)
    x2, y2 = make_cls(6, seed=3)
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert x.max() > x.min() + 100  # ink on a light background


def test_det_masks_cover_the_drawn_lines() -> None:
    x, y = make_det(2, seed=1, size=(128, 160))
    assert x.shape == (2, 3, 128, 160) and y.shape == (2, 128, 160)
    assert set(np.unique(y)) <= {0, 1} and y.sum() > 0
    gray = x.astype(np.float64).mean(axis=1)
    assert gray[y == 1].mean() < gray[y == 0].mean() - 5  # text pixels are darker on average


def test_ctc_greedy_merges_repeats_drops_blanks_and_outer_spaces() -> None:
    steps = np.array([[0, 3, 3, 0, 3, 5, 5, 9, 0, 9]])
    logits = np.eye(10)[steps]
    assert ctc_greedy(logits) == [(3, 3, 5, 9, 9)]
    assert ctc_greedy(logits, strip=9) == [(3, 3, 5)]
    assert ctc_greedy(np.eye(10)[np.array([[9, 0, 4, 9]])], strip=9) == [(4,)]
