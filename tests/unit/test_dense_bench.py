"""Pure helpers of the dense benchmarks (``benchmarks/dense_data.py``, ``dense_tasks.py``, ``dense_selection.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import dense_data
from benchmarks.dense_selection import (
    Bench,
    comparison_lines,
    goal_lines,
    has_cell,
    paired,
    report,
    text_map_metrics,
)
from benchmarks.dense_tasks import _det_targets, decode_yolo


def test_sequence_canvases_follow_the_text_convention() -> None:
    x, y = dense_data.make_seq(20, 3, "test")
    again, y_again = dense_data.make_seq(20, 3, "test")
    assert x.shape == (20, 1, *dense_data.SEQ_SHAPE) and x.dtype == np.uint8
    assert np.array_equal(x, again) and np.array_equal(y, y_again)  # seeded
    lengths = (y >= 0).sum(1)
    assert lengths.min() >= 1 and lengths.max() <= dense_data.SEQ_MAX
    for row, n in zip(y, lengths, strict=True):  # classes 1..10 first, -1 padding after
        assert np.all((row[:n] >= 1) & (row[:n] <= 10)) and np.all(row[n:] == -1)


def test_segmentation_maps_label_the_ink() -> None:
    x, y = dense_data.make_seg(10, 0, "train")
    assert y.shape == (10, dense_data.SEG_SIZE, dense_data.SEG_SIZE)
    labelled = (y >= 1) & (y <= 10)
    assert set(np.unique(y)) <= {*range(11), dense_data.IGNORE}
    assert np.all(x[:, 0][labelled] >= 100)  # stroke pixels (>= 128, minus noise) carry a digit class
    assert labelled.any() and (y == 0).any() and (y == dense_data.IGNORE).any()


def test_detection_boxes_hold_ink_and_round_trip_through_coco(tmp_path) -> None:
    x, boxes = dense_data.make_det(6, 1, "test")
    for image, rows in zip(x, boxes, strict=True):
        assert 1 <= len(rows) <= 5
        for x1, y1, x2, y2, c in rows:
            assert 0 <= x1 < x2 <= dense_data.DET_SIZE and 0 <= y1 < y2 <= dense_data.DET_SIZE and 0 <= c <= 9
            assert image[0, int(y1):int(y2), int(x1):int(x2)].max() >= 32
    dense_data.write_yolo(tmp_path, "test", x, boxes)
    back = dense_data.read_coco_boxes(tmp_path / "annotations" / "instances_test.json")
    assert all(np.allclose(a, b) for a, b in zip(back, boxes, strict=True))
    line = (tmp_path / "labels" / "test" / "000000.txt").read_text().splitlines()[0].split()
    x1, y1, x2, y2, c = boxes[0][0]
    size = dense_data.DET_SIZE
    assert int(line[0]) == c and float(line[1]) == pytest.approx((x1 + x2) / 2 / size, abs=1e-6)
    assert float(line[3]) == pytest.approx((x2 - x1) / size, abs=1e-6)
    assert (tmp_path / "images" / "test" / "000005.png").is_file()


def test_every_box_gets_a_positive_anchor_of_its_class() -> None:
    _, boxes = dense_data.make_det(8, 2, "train")
    box_t, cls_t = _det_targets(boxes)
    assert box_t.shape == (8, 180, 4) and cls_t.shape == (8, 180)
    for i, rows in enumerate(boxes):
        for row in rows:
            hit = np.all(np.isclose(box_t[i], row[:4]), axis=1)
            assert hit.any() and np.all(cls_t[i][hit] == row[4])


def yolo_output(rows: list[tuple[float, ...]], k: int = 3) -> np.ndarray:
    """``[1, 4 + k, A]`` with one anchor per row ``(cx, cy, w, h, class, score)``."""
    out = np.zeros((1, 4 + k, len(rows)), np.float32)
    for a, (cx, cy, w, h, c, s) in enumerate(rows):
        out[0, :4, a] = (cx, cy, w, h)
        out[0, 4 + int(c), a] = s
    return out


def test_decode_yolo_suppresses_overlaps_per_class() -> None:
    out = yolo_output([(10, 10, 10, 10, 0, 0.9), (11, 10, 10, 10, 0, 0.8), (11, 10, 10, 10, 1, 0.7),
                       (50, 50, 8, 8, 2, 0.0005)])
    (dets,) = decode_yolo(out)
    # the second class-0 box overlaps the first (IoU 0.82 > 0.6): suppressed; class 1 kept; the last is below 0.001
    assert dets.shape == (2, 6)
    assert np.allclose(dets[0], [5, 5, 15, 15, 0.9, 0]) and np.allclose(dets[1], [6, 5, 16, 15, 0.7, 1])


def test_text_map_metrics() -> None:
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2] = True  # 8 text pixels
    binary = np.zeros_like(mask)
    binary[0, 1:3] = True  # 8 predicted, 4 right
    got = text_map_metrics(binary, mask, reference=mask)
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(0.5) and got["iou_original"] == pytest.approx(4 / 12)
    assert text_map_metrics(mask, mask, reference=mask)["iou_original"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):  # a [N, 1, H, W] map against [N, H, W] masks
        text_map_metrics(binary, mask, reference=mask[:, None])


def doc_with(cells: dict) -> dict:
    return {"protocol": {"seeds": 3, "targets": [0.5], "methods": ["di-data", "l2", "random"], "machine": {}},
            "commands": {"python -m benchmarks.dense_selection": "x"},
            "benches": {"seg": {"setup": {"primary": "miou", "n_calib": 8, "n_eval": 4},
                                "original": {"miou": 0.9, "pixel_accuracy": 0.95}, "cells": cells}}}


def test_paired_comparison_and_report() -> None:
    def cells(values):
        return {"lstsq": {"0.5": {str(s): {"miou": v, "macs_fraction": 0.5} for s, v in enumerate(values)}}}

    data = {"di-data": cells([0.80, 0.82, 0.81]), "l2": cells([0.70, 0.71, 0.72]),
            "random": {"lstsq": {"0.5": {"0": {"error": "boom"}}}}}
    per = {m: {s: c["miou"] for s, c in data[m]["lstsq"]["0.5"].items()} for m in ("di-data", "l2")}
    mean, se, n = paired(per["di-data"], per["l2"])
    assert n == 3 and mean == pytest.approx(0.1) and se == pytest.approx(np.std([0.1, 0.11, 0.09], ddof=1) / 3 ** 0.5)
    lines = comparison_lines(data, "miou", [0.5])
    assert any(line.startswith("| di-data - l2 | lstsq | +10.0 ± 0.6 ahead") for line in lines)
    text = report(doc_with(data))
    assert "| di-data | lstsq | 81.0 ± 0.6 |" in text and "- `random`: boom" in text
    assert "| l2 | none | not run |" in text


def test_goal_lines_give_a_verdict_per_task() -> None:
    def cells(rows):
        return {m: {"lstsq": {str(t): {str(s): {"miou": v} for s, v in enumerate(vals)} for t in (0.35, 0.25)}}
                for m, vals in rows.items()}

    ahead = cells({"di-data": [0.8, 0.82, 0.81], "di-model": [0.70, 0.72, 0.71], "l2": [0.70, 0.71, 0.72],
                   "random": [0.6, 0.62, 0.61]})
    mixed = cells({"di-data": [0.8, 0.82, 0.81], "di-model": [0.5, 0.52, 0.51], "l2": [0.9, 0.91, 0.92],
                   "random": [0.6, 0.62, 0.61]})
    doc = {"benches": {task: {"setup": {"primary": "miou"}, "cells": c}
                       for task, c in (("seq", ahead), ("seg", ahead), ("det", mixed))}}
    text = "\n".join(goal_lines(doc))
    assert "- di-data ahead of l2 and random by > 2 SE at <= 0.35 of the MACs after lstsq: 2 of 3 tasks checked " \
           "(seq at 0.35: +10.0 ± 0.6 / +20.0 ± 0.0; seg at 0.35: +10.0 ± 0.6 / +20.0 ± 0.0; points over l2 / random); goal: 2 of 3: met" in text
    assert "- di-model ahead of l2 and random by > 2 SE at <= 0.35 of the MACs after lstsq: 0 of 3 tasks checked " \
           "(none; points over l2 / random); goal: 2 of 3: not met" in text
    assert "| det (miou) | 0.35 | -10.0 ± 0.6 behind | +20.0 ± 0.0 ahead | -40.0 ± 0.6 behind | -10.0 ± 0.0 behind |" \
        in text
    assert "not measured" in "\n".join(goal_lines({"benches": {}}))


def test_recorded_errors_are_rerun() -> None:
    cells = {"di-data": {"lstsq": {"0.35": {"0": {"error": "refused"}, "1": {"miou": 0.5}}}}}
    assert not has_cell(cells, "di-data", "lstsq", 0.35, 0) and has_cell(cells, "di-data", "lstsq", 0.35, 1)
    assert not has_cell(cells, "di-data", "lstsq", 0.25, 1) and not has_cell(cells, "l2", "lstsq", 0.35, 1)


def test_labelled_calibration_subsets_pair_labels_with_their_samples(tmp_path) -> None:
    """Subset s of a bench reads the labels of training samples [s n, (s + 1) n): npz arrays and YOLO files."""
    x = np.arange(6 * 8 * 8, dtype=np.uint8).reshape(6, 1, 8, 8)
    seqs = np.array([[i, i, -1] for i in range(6)])
    np.savez(tmp_path / "seq.npz", x_train=x, y_train=seqs, x_test=x[:1], y_test=seqs[:1])
    bench = Bench("seq", tmp_path / "m.onnx", tmp_path / "seq.npz", n_calib=2, n_eval=1, output_kind="sequence",
                  label_format="text", primary="exact")
    data = bench.calibration(1, "x", labelled=True)
    assert data.num_samples == 2 and data.targets.kind == "sequence"
    assert [t.tolist() for t in data.targets.take(0, 2)] == [[2, 2], [3, 3]]
    assert bench.calibration(1, "x").targets is None
    boxes = [np.array([[1, 1, 5, 5, i]], np.float64) for i in range(6)]
    dense_data.write_yolo(tmp_path / "det", "train", x, boxes)
    np.savez(tmp_path / "det.npz", x_train=x, x_test=x[:1])
    det = Bench("det", tmp_path / "m.onnx", tmp_path / "det.npz", n_calib=2, n_eval=1, output_kind="yolo",
                label_format="yolo", primary="map50", det_root=tmp_path / "det")
    data = det.calibration(2, "x", labelled=True)
    assert data.targets.kind == "boxes"
    assert [int(t[0, 0]) for t in data.targets.take(0, 2)] == [4, 5]  # samples 4 and 5 carry classes 4 and 5
