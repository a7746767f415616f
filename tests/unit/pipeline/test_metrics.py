"""Dense metrics (pipeline/evaluation/metrics.py): hand-computable cases, a brute-force COCO AP reference, shard merges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import UserInputError
from pipeline.evaluation.metrics import (
    IOU_THRESHOLDS,
    METRICS,
    DetectionMetric,
    SegmentationMetric,
    SequenceMetric,
    merge_all,
    new_metric,
)

pytest.importorskip("pycocotools", reason="detection mAP needs the [metrics] extra (pycocotools)")
pytest.importorskip("editdistance", reason="sequence metrics need the [metrics] extra (editdistance)")


def det(*rows: tuple[float, ...]) -> np.ndarray:
    return np.array(rows, dtype=np.float64).reshape(len(rows), -1)


class TestDetectionHandComputed:
    def test_perfect_detections_score_one(self) -> None:
        m = DetectionMetric(3)
        m.update(det((0, 0, 10, 10, 0.9, 0), (20, 20, 40, 30, 0.8, 2)), det((0, 0, 10, 10, 0), (20, 20, 40, 30, 2)))
        m.update(det((5, 5, 15, 25, 0.7, 1)), det((5, 5, 15, 25, 1)))
        r = m.result()
        assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0) and r["images"] == 2

    def test_iou_062_counts_at_three_of_ten_thresholds(self) -> None:
        m = DetectionMetric(1)
        m.update(det((0, 0, 10, 6.2, 0.9, 0)), det((0, 0, 10, 10, 0)))  # IoU = 62 / 100
        r = m.result()
        assert r["map50"] == pytest.approx(1.0)
        assert r["map50_95"] == pytest.approx(0.3)  # thresholds 0.50, 0.55, 0.60 of ten

    def test_false_positive_above_the_true_one_halves_ap(self) -> None:
        # ranked FP (p=0, r=0) then TP (p=0.5, r=1): the interpolated precision is 0.5 at every recall point
        m = DetectionMetric(1)
        m.update(det((50, 50, 60, 60, 0.9, 0), (0, 0, 10, 10, 0.5, 0)), det((0, 0, 10, 10, 0)))
        assert m.result()["map50"] == pytest.approx(0.5)

    def test_true_positive_above_the_false_one_is_perfect(self) -> None:
        m = DetectionMetric(1)
        m.update(det((0, 0, 10, 10, 0.9, 0), (50, 50, 60, 60, 0.5, 0)), det((0, 0, 10, 10, 0)))
        assert m.result()["map50"] == pytest.approx(1.0)

    def test_half_the_objects_found(self) -> None:
        # two objects, one found: recall reaches 0.5 with precision 1 -> 51 of the 101 recall points
        m = DetectionMetric(1)
        m.update(det((0, 0, 10, 10, 0.9, 0)), det((0, 0, 10, 10, 0), (30, 30, 40, 40, 0)))
        assert m.result()["map50"] == pytest.approx(51 / 101)

    def test_classes_averaged_over_those_present(self) -> None:
        m = DetectionMetric(4)
        # class 0 perfect, class 1 missed, class 3 only predicted (no ground truth: not averaged)
        m.update(det((0, 0, 10, 10, 0.9, 0), (70, 70, 80, 80, 0.9, 3)), det((0, 0, 10, 10, 0), (30, 30, 40, 40, 1)))
        assert m.result()["map50"] == pytest.approx(0.5)

    def test_wrong_class_is_a_miss(self) -> None:
        m = DetectionMetric(2)
        m.update(det((0, 0, 10, 10, 0.9, 1)), det((0, 0, 10, 10, 0)))
        assert m.result()["map50"] == pytest.approx(0.0)

    def test_no_ground_truth_is_undefined(self) -> None:
        m = DetectionMetric(2)
        m.update(det((0, 0, 10, 10, 0.9, 1)), np.zeros((0, 5)))
        r = m.result()
        assert math.isnan(r["map50"]) and math.isnan(r["map50_95"]) and r["images"] == 1

    def test_empty_predictions_score_zero(self) -> None:
        m = DetectionMetric(1)
        m.update(np.zeros((0, 6)), det((0, 0, 10, 10, 0)))
        assert m.result()["map50_95"] == pytest.approx(0.0)

    @pytest.mark.parametrize(("pred", "target", "match"), [
        (np.zeros((2, 5)), np.zeros((0, 5)), "shape"),
        (det((0, 0, 10, 10, 0.9, 2)), np.zeros((0, 5)), "class ids"),
        (det((0, 0, 10, 10, 0.9, 0.5)), np.zeros((0, 5)), "class ids"),
        (det((10, 0, 0, 10, 0.9, 0)), np.zeros((0, 5)), "x2 >= x1"),
    ], ids=["width", "class-range", "class-fraction", "inverted"])
    def test_bad_input_is_refused(self, pred: np.ndarray, target: np.ndarray, match: str) -> None:
        with pytest.raises(UserInputError, match=match):
            DetectionMetric(2).update(pred, target)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_ap(images: list[tuple[np.ndarray, np.ndarray]], cls: int, t: float) -> float | None:
    """Brute-force COCO AP of one class at one IoU threshold (greedy matching by score, 101-point interpolation)."""
    scored, n_gt = [], 0
    for preds, gts in images:
        g = gts[gts[:, 4] == cls]
        n_gt += len(g)
        used = np.zeros(len(g), bool)
        for p in sorted(preds[preds[:, 5] == cls], key=lambda r: -r[4]):
            ious = [(_iou(p, gg), j) for j, gg in enumerate(g) if not used[j]]
            best = max(ious, default=(0.0, -1))
            hit = best[0] >= t
            if hit:
                used[best[1]] = True
            scored.append((p[4], hit))
    if n_gt == 0:
        return None
    scored.sort(key=lambda s: -s[0])
    hits = np.cumsum([h for _, h in scored])
    recall = hits / n_gt
    precision = hits / np.arange(1, len(scored) + 1)
    total = 0.0
    for r in np.linspace(0, 1, 101):
        reached = precision[recall >= r - 1e-12]
        total += reached.max() if reached.size else 0.0
    return total / 101


def random_scene(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    gts = []
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, 80, 2)
        gts.append((x, y, x + rng.uniform(8, 20), y + rng.uniform(8, 20), int(rng.integers(k))))
    preds = []
    for g in gts:
        if rng.random() < 0.8:
            jitter = rng.uniform(-4, 4, 4)
            cls = g[4] if rng.random() < 0.85 else int(rng.integers(k))
            preds.append((*(np.array(g[:4]) + jitter), rng.uniform(0.1, 1), cls))
    for _ in range(int(rng.integers(0, 3))):
        x, y = rng.uniform(0, 80, 2)
        preds.append((x, y, x + rng.uniform(8, 20), y + rng.uniform(8, 20), rng.uniform(0.1, 1), int(rng.integers(k))))
    p = np.array(preds).reshape(-1, 6)
    p[:, [2, 3]] = np.maximum(p[:, [2, 3]], p[:, [0, 1]] + 1)
    return p, np.array(gts, dtype=np.float64).reshape(-1, 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_equals_a_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 3
    images = [random_scene(rng, k) for _ in range(12)]
    m = DetectionMetric(k)
    for p, g in images:
        m.update(p, g)
    per = {t: [a for c in range(k) if (a := reference_ap(images, c, t)) is not None] for t in IOU_THRESHOLDS}
    r = m.result()
    assert r["map50"] == pytest.approx(np.mean(per[0.5]), abs=1e-9)
    assert r["map50_95"] == pytest.approx(np.mean([np.mean(v) for v in per.values()]), abs=1e-9)


def test_detection_shards_merge_to_the_whole() -> None:
    rng = np.random.default_rng(7)
    images = [random_scene(rng, 2) for _ in range(9)]
    whole, parts = DetectionMetric(2), [DetectionMetric(2) for _ in range(3)]
    for i, (p, g) in enumerate(images):
        whole.update(p, g)
        parts[i // 3].update(p, g)
    merged = merge_all(parts)
    assert merged.result() == whole.result()
    assert parts[0].result()["images"] == 3  # merging does not change its inputs


class TestSegmentation:
    def test_hand_computed_iou(self) -> None:
        target = np.array([[[0, 0, 1, 1], [0, 0, 1, 255]]])
        pred = np.array([[[0, 1, 1, 1], [0, 0, 2, 2]]])
        m = SegmentationMetric(4)
        m.update(pred, target)
        r = m.result()
        # class 0: inter 3, union 4; class 1: inter 2, union 4 (target 3 + pred 3 - 2); class 2: inter 0, union 1;
        # class 3: absent from both -> None, excluded; the 255 pixel is ignored
        assert r["per_class_iou"] == pytest.approx([0.75, 0.5, 0.0, None])
        assert r["miou"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
        assert r["pixel_accuracy"] == pytest.approx(5 / 7)
        assert r["pixels"] == 7

    def test_shards_merge_to_the_whole(self) -> None:
        rng = np.random.default_rng(0)
        pred, target = rng.integers(0, 5, (6, 8, 8)), rng.integers(0, 5, (6, 8, 8))
        whole, a, b = SegmentationMetric(5), SegmentationMetric(5), SegmentationMetric(5)
        whole.update(pred, target)
        a.update(pred[:2], target[:2])
        b.update(pred[2:], target[2:])
        assert a.merge(b).result() == whole.result()

    def test_equals_a_per_class_count(self) -> None:
        rng = np.random.default_rng(1)
        pred, target = rng.integers(0, 3, (4, 5, 5)), rng.integers(0, 3, (4, 5, 5))
        m = SegmentationMetric(3)
        m.update(pred, target)
        want = [np.sum((pred == c) & (target == c)) / np.sum((pred == c) | (target == c)) for c in range(3)]
        assert m.result()["per_class_iou"] == pytest.approx(want)

    @pytest.mark.parametrize(("pred", "target", "match"), [
        (np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int), "shape"),
        (np.full((1, 2, 2), 3), np.zeros((1, 2, 2), int), "predicted class ids"),
        (np.zeros((1, 2, 2), int), np.full((1, 2, 2), 7), "target class ids"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2), int), "integers"),
    ], ids=["shape", "pred-range", "target-range", "float"])
    def test_bad_input_is_refused(self, pred: np.ndarray, target: np.ndarray, match: str) -> None:
        with pytest.raises(UserInputError, match=match):
            SegmentationMetric(3).update(pred, target)


class TestSequence:
    def test_hand_computed(self) -> None:
        m = SequenceMetric()
        # kitten -> sitting: 3 edits over 7 target elements; an exact pair; a padded row
        m.update([[10, 8, 19, 19, 4, 13], [1, 2, 3], np.array([5, 6, -1, -1])],
                 [[18, 8, 19, 19, 8, 13, 6], [1, 2, 3], np.array([5, 6, 7, -1])])
        r = m.result()
        assert r["cer"] == pytest.approx((3 + 0 + 1) / (7 + 3 + 3))
        assert r["exact"] == pytest.approx(1 / 3) and r["sequences"] == 3

    def test_empty_sequences(self) -> None:
        m = SequenceMetric()
        m.update([[]], [[]])
        assert m.result() == {"cer": 0.0, "exact": 1.0, "sequences": 1}
        m.update([[1]], [[]])
        assert m.result()["cer"] == math.inf

    def test_shards_merge_to_the_whole(self) -> None:
        rng = np.random.default_rng(3)
        pairs = [(rng.integers(0, 4, rng.integers(0, 6)).tolist(), rng.integers(0, 4, rng.integers(1, 6)).tolist())
                 for _ in range(10)]
        whole, a, b = SequenceMetric(), SequenceMetric(), SequenceMetric()
        whole.update(*zip(*pairs, strict=True))
        a.update(*zip(*pairs[:4], strict=True))
        b.update(*zip(*pairs[4:], strict=True))
        assert a.merge(b).result() == whole.result()

    def test_count_mismatch_is_refused(self) -> None:
        with pytest.raises(UserInputError, match="2 predicted sequences for 1 targets"):
            SequenceMetric().update([[1], [2]], [[1]])


def test_registry_and_factory() -> None:
    assert set(METRICS) == {"sequence", "map", "yolo"}
    assert isinstance(new_metric("yolo", 3), DetectionMetric)
    assert isinstance(new_metric("map", 3), SegmentationMetric)
    assert isinstance(new_metric("sequence"), SequenceMetric)
    with pytest.raises(UserInputError, match="number of classes"):
        new_metric("map")
    with pytest.raises(UserInputError, match="no dense metric"):
        new_metric("classes", 3)
    with pytest.raises(TypeError, match="cannot merge"):
        SequenceMetric().merge(SegmentationMetric(2))  # type: ignore[arg-type]
