"""Label grids and location sampling against brute-force references written out cell by cell."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data.locations import (
    REFERENCE_GRID,
    Sampling,
    boxes_on_grid,
    grid_labels,
    line_on_grid,
    location_rng,
    map_on_grid,
    sample_cells,
    view_of,
)
from pipeline.errors import UserInputError


def _span(i: int, cells: int, length: int) -> range:
    return range(math.floor(i * length / cells), math.ceil((i + 1) * length / cells))


def _brute_majority(labels: np.ndarray, grid: tuple[int, int], background: int | None) -> np.ndarray:
    out = np.full(grid, -1)
    for i in range(grid[0]):
        for j in range(grid[1]):
            counts: dict[int, int] = {}
            for r in _span(i, grid[0], labels.shape[0]):
                for c in _span(j, grid[1], labels.shape[1]):
                    if labels[r, c] >= 0:
                        counts[int(labels[r, c])] = counts.get(int(labels[r, c]), 0) + 1
            if counts:  # most pixels; ties: not the background, then the smallest id
                out[i, j] = min(counts, key=lambda k: (-counts[k], k == background, k))
    return out


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 9), (16, 16), (20, 11)], ids=str)
def test_map_on_grid_is_the_majority_of_each_cells_span(grid: tuple[int, int]) -> None:
    rng = np.random.default_rng(grid[0] * 31 + grid[1])
    labels = rng.integers(0, 4, (16, 13))
    labels[rng.random(labels.shape) < 0.1] = -1  # ignored pixels
    labels[:5, :5] = -1  # a region that is all ignored
    np.testing.assert_array_equal(map_on_grid(labels, grid, 0), _brute_majority(labels, grid, 0))


def test_ties_prefer_objects_then_small_ids() -> None:
    labels = np.array([[0, 2, 1, 0]])
    assert map_on_grid(labels, (1, 2), background=0).tolist() == [[2, 1]]
    assert line_on_grid(np.array([0, 3, 3, 0, 0, 5]), 2, background=0).tolist() == [3, 0]


def _brute_boxes(boxes: np.ndarray, grid: tuple[int, int], background: int) -> np.ndarray:
    h, w = grid
    out = np.full(grid, background)
    area = np.full(grid, np.inf)
    for cls, cx, cy, bw, bh in boxes:
        hit = False
        for i in range(h):
            for j in range(w):
                x, y = (j + 0.5) / w, (i + 0.5) / h
                if cx - bw / 2 <= x <= cx + bw / 2 and cy - bh / 2 <= y <= cy + bh / 2:
                    hit = True
                    if bw * bh < area[i, j]:
                        out[i, j], area[i, j] = cls, bw * bh
        if not hit:
            i, j = min(int(cy * h), h - 1), min(int(cx * w), w - 1)
            if bw * bh < area[i, j]:
                out[i, j], area[i, j] = cls, bw * bh
    return out


@pytest.mark.parametrize("grid", [(4, 4), (8, 6), (13, 13)], ids=str)
def test_boxes_on_grid_smallest_box_wins_and_tiny_boxes_keep_a_cell(grid: tuple[int, int]) -> None:
    boxes = np.array([[0, 0.5, 0.5, 0.8, 0.6],  # large
                      [1, 0.4, 0.45, 0.3, 0.3],  # inside the large one: wins where they overlap
                      [2, 0.91, 0.12, 0.02, 0.03]])  # smaller than a cell: the cell of its centre
    out = boxes_on_grid(boxes, grid, background=3)
    np.testing.assert_array_equal(out, _brute_boxes(boxes, grid, 3))
    assert {0, 1, 2, 3} <= set(out.ravel().tolist())


def _brute_sample(labels: np.ndarray, keys: np.ndarray, per_class: int, ratio: float, background: int) -> set[int]:
    chosen: set[int] = set()
    fg_total = 0
    for k in sorted(set(labels[labels >= 0].tolist()) - {background}):
        cells = sorted(np.flatnonzero(labels == k), key=lambda c: keys[c])[:per_class]
        chosen |= set(cells)
        fg_total += len(cells)
    bg = sorted(np.flatnonzero(labels == background), key=lambda c: keys[c])
    quota = math.ceil(ratio * fg_total) if fg_total else per_class
    return chosen | set(bg[:quota])


@pytest.mark.parametrize(("per_class", "ratio"), [(1, 1.0), (3, 0.5), (16, 2.0), (4, 0.0)])
def test_sampling_is_class_balanced_and_reproducible(per_class: int, ratio: float) -> None:
    rng = np.random.default_rng(per_class)
    labels = rng.choice([0, 0, 0, 0, 1, 2, 5, -1], size=200)
    sampling = Sampling(per_class=per_class, background_ratio=ratio)
    cells = sample_cells(labels, location_rng(7, 3, "probe"), sampling, background=0)
    keys = location_rng(7, 3, "probe").random(labels.size)
    assert set(cells.tolist()) == _brute_sample(labels, keys, per_class, ratio, 0)
    assert np.all(np.diff(cells) > 0) and np.all(labels[cells] >= 0)
    again = sample_cells(labels, location_rng(7, 3, "probe"), sampling, background=0)
    np.testing.assert_array_equal(cells, again)
    other = sample_cells(labels, location_rng(7, 4, "probe"), sampling, background=0)
    assert len(other) == len(cells)  # another sample index draws other cells of the same counts


def test_background_only_image_takes_per_class_cells() -> None:
    labels = np.zeros(50, np.int64)
    assert len(sample_cells(labels, location_rng(0, 0, "p"), Sampling(per_class=5), background=0)) == 5


def test_views_of_probes() -> None:
    assert view_of("a", (None, 8, 6, 10), "map") == view_of("a", (None, 8, 6, 10), "boxes")
    assert view_of("a", (None, 8, 6, 10), "map").kind == "grid"
    assert view_of("a", (None, 8, 6, 10), "sequence").grid == (10,)
    assert view_of("a", (None, 8, 40), "sequence").kind == "line"
    for shape, target in (((None, 8), "map"), ((None, 8, 1, 1), "boxes"), ((None, 8, 40), "map"),
                          ((None, 8, 6, 1), "sequence")):
        assert view_of("a", shape, target).kind == "pooled"


def test_pooled_views_use_a_reference_grid() -> None:
    boxes = np.array([[1, 0.5, 0.5, 0.5, 0.5]])
    grid = grid_labels("pooled", "boxes", boxes, (), background=2)
    assert grid.shape == (REFERENCE_GRID, REFERENCE_GRID) and set(grid.ravel().tolist()) == {1, 2}
    assert grid_labels("pooled", "sequence", np.array([0, 3, 3, 0]), (), 0).tolist() == [0, 3, 3, 0]


def test_bad_sampling_options() -> None:
    with pytest.raises(UserInputError, match="--locations-per-class"):
        Sampling(per_class=0)
    with pytest.raises(UserInputError, match="--background-ratio"):
        Sampling(background_ratio=-1.0)
