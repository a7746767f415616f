"""Dense task metrics as streaming accumulators: detection mAP, segmentation mIoU, sequence CER / exact match.

Every metric is fed decoded outputs (decoding raw model outputs into boxes, class maps or label sequences is
:mod:`pipeline.data.outputs`' job) one batch at a time with ``update(predicted, target)``; ``result()`` gives a JSON-ready
dict, and ``merge(other)`` combines two accumulators of the same kind (e.g. computed on shards of one evaluation set)
into a new one whose result equals the result of one accumulator fed both shards. :data:`METRICS` maps an output
kind (``sequence``, ``map``, ``yolo``; the ``classes`` kind keeps its top-1 path in :mod:`pipeline.evaluation.evaluate`) to its
accumulator.

Definitions:

* :class:`DetectionMetric` (``yolo``): the COCO definition, computed by pycocotools' ``COCOeval`` (the reference
  implementation; the ``[metrics]`` extra, imported lazily). Per class and IoU threshold ``t`` in 0.50:0.05:0.95,
  detections (at most ``max_detections`` per image, by score) are matched greedily by score to the unmatched ground
  truth box of the same class with the highest IoU >= ``t``; AP is the mean over the 101 recall points 0:0.01:1 of
  the interpolated precision ``p(r) = max_{r' >= r} precision(r')`` (0 where recall r is never reached).
  ``map50`` = mean over classes of AP at ``t = 0.5``; ``map50_95`` = mean over classes and the ten thresholds. Classes
  are averaged over those with ground truth in the evaluated images ("classes present"); a class that is only
  predicted adds nothing (its detections are false positives of no class present). IoU of boxes in pixel
  coordinates with no +1 (``area = (x2 - x1) * (y2 - y1)``), as pycocotools computes it. With no ground truth box
  at all, both values are NaN (undefined).
* :class:`SegmentationMetric` (``map``): a ``K x K`` confusion matrix ``C[t, p]`` over every pixel whose target is
  not ``ignore_index``. ``IoU_c = C[c, c] / (sum_p C[c, p] + sum_t C[t, c] - C[c, c])``; ``miou`` is the mean of
  ``IoU_c`` over the classes that occur in the target or the prediction (a class absent from both has no IoU: it is
  ``None`` in ``per_class_iou`` and left out of the mean); ``pixel_accuracy = trace(C) / sum(C)``.
* :class:`SequenceMetric` (``sequence``): ``cer = sum_i edit(p_i, t_i) / sum_i len(t_i)`` (Levenshtein distance:
  insertions, deletions and substitutions of one element each cost 1; the ``editdistance`` package of the
  ``[metrics]`` extra) and ``exact`` = fraction of sequences with ``p_i == t_i``. Negative entries are padding and
  are dropped, so ``(N, L)`` label arrays padded with -1 can be passed as they are. With empty targets only,
  ``cer`` is 0 when every prediction is empty too, else infinite.

All sums are integers (or per-image records for detection), so merging is exact and order-free.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import UserInputError

METRICS_EXTRA = "pip install 'diprune[metrics]'"
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _require(module: str, purpose: str) -> Any:
    """Import an optional metrics library, or a UserInputError naming the ``[metrics]`` extra."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise UserInputError(f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed: "
                             f"{METRICS_EXTRA}") from err


NEEDS = {"yolo": "pycocotools", "sequence": "editdistance"}
"""The optional package the metric of an output kind needs (the ``[metrics]`` extra); maps need none."""


def available(kind: str) -> bool:
    """Whether the metric of output kind ``kind`` can run here (its optional package is installed)."""
    import importlib.util

    return kind not in NEEDS or importlib.util.find_spec(NEEDS[kind]) is not None


def _check_same_kind(a: Any, b: Any) -> None:
    if type(a) is not type(b):
        raise TypeError(f"cannot merge {type(a).__name__} with {type(b).__name__}")


@dataclass
class DetectionMetric:
    """COCO mAP@0.5 and mAP@0.5:0.95 over images fed one at a time (see the module docstring).

    Args:
        num_classes: number of classes; class ids are ``0 .. num_classes - 1``.
        max_detections: detections kept per image, highest scores first (COCO: 100).
    """

    num_classes: int
    max_detections: int = 100
    _predictions: list[np.ndarray] = field(default_factory=list, repr=False)
    _targets: list[np.ndarray] = field(default_factory=list, repr=False)

    def update(self, predictions: np.ndarray, targets: np.ndarray) -> None:
        """Add one image: ``predictions (M, 6)`` ``[x1, y1, x2, y2, score, class]`` and ``targets (G, 5)``
        ``[x1, y1, x2, y2, class]``, in pixels (M or G may be 0)."""
        self._predictions.append(self._checked(predictions, 6, "predictions"))
        self._targets.append(self._checked(targets, 5, "targets"))

    def _checked(self, boxes: np.ndarray, width: int, what: str) -> np.ndarray:
        arr = np.asarray(boxes, dtype=np.float64)
        if arr.size == 0:
            return np.zeros((0, width))
        if arr.ndim != 2 or arr.shape[1] != width:
            raise UserInputError(f"detection {what} of one image must have shape (n, {width}), got {arr.shape}")
        cls = arr[:, -1]
        if np.any(cls != np.round(cls)) or np.any(cls < 0) or np.any(cls >= self.num_classes):
            raise UserInputError(f"detection {what}: class ids must be integers in [0, {self.num_classes}), got "
                                 f"{sorted(set(cls.tolist()))[:8]}")
        if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]) or not np.all(np.isfinite(arr)):
            raise UserInputError(f"detection {what}: boxes must be finite [x1, y1, x2, y2] with x2 >= x1, y2 >= y1")
        return arr

    def merge(self, other: DetectionMetric) -> DetectionMetric:
        """A new accumulator holding this one's images, then ``other``'s."""
        _check_same_kind(self, other)
        if (other.num_classes, other.max_detections) != (self.num_classes, self.max_detections):
            raise ValueError("cannot merge detection metrics with different classes or detection limits")
        return DetectionMetric(self.num_classes, self.max_detections, [*self._predictions, *other._predictions],
                               [*self._targets, *other._targets])

    def result(self) -> dict[str, Any]:
        """``{"map50", "map50_95", "images"}`` (NaN maps without any ground truth box)."""
        images = len(self._targets)
        if not any(len(t) for t in self._targets):
            return {"map50": float("nan"), "map50_95": float("nan"), "images": images}
        stats = self._coco_stats()
        return {"map50": stats[1], "map50_95": stats[0], "images": images}

    def _coco_stats(self) -> list[float]:
        """pycocotools' summary statistics (its progress prints swallowed)."""
        coco = _require("pycocotools.coco", "detection mAP")
        cocoeval = _require("pycocotools.cocoeval", "detection mAP")
        gt = coco.COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(self._targets))],
                      "categories": [{"id": c + 1} for c in range(self.num_classes)],
                      "annotations": [_annotation(n, i + 1, box)
                                      for n, (i, box) in enumerate(_boxes(self._targets), start=1)]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            dt = coco.COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": [_annotation(n, i + 1, box[[0, 1, 2, 3, 5]], score=float(box[4]))
                                          for n, (i, box) in enumerate(_boxes(self._predictions), start=1)]}
            dt.createIndex()
            ev = cocoeval.COCOeval(gt, dt, "bbox")
            ev.params.iouThrs = np.asarray(IOU_THRESHOLDS)
            ev.params.maxDets = [1, 10, self.max_detections]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return [float(s) for s in ev.stats[:2]]



def _boxes(per_image: Sequence[np.ndarray]) -> Iterable[tuple[int, np.ndarray]]:
    """``(image index, box row)`` of every box of every image, in order."""
    for i, boxes in enumerate(per_image):
        for box in boxes:
            yield i, box

def _annotation(ann_id: int, image_id: int, box: np.ndarray, score: float | None = None) -> dict[str, Any]:
    """A COCO annotation (``xywh`` box, area w * h, not crowd) from ``[x1, y1, x2, y2, class]``."""
    x1, y1, x2, y2, cls = (float(v) for v in box)
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
           "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
    return ann if score is None else {**ann, "score": score}


@dataclass
class SegmentationMetric:
    """Confusion-matrix mIoU and pixel accuracy of class maps (see the module docstring).

    Args:
        num_classes: number of classes; class ids are ``0 .. num_classes - 1``.
        ignore_index: target value of pixels that are not scored.
    """

    num_classes: int
    ignore_index: int | None = 255
    confusion: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, predicted: np.ndarray, target: np.ndarray) -> None:
        """Add a batch of class maps, ``predicted`` and ``target`` of the same shape ``(N, H, W)`` (integers)."""
        pred, tgt = np.asarray(predicted), np.asarray(target)
        if pred.shape != tgt.shape:
            raise UserInputError(f"predicted class maps {pred.shape} and targets {tgt.shape} differ in shape")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(tgt.dtype, np.integer)):
            raise UserInputError(f"class maps must be integers, got {pred.dtype} and {tgt.dtype}")
        valid = tgt != self.ignore_index if self.ignore_index is not None else np.ones(tgt.shape, bool)
        p, t = pred[valid].astype(np.int64), tgt[valid].astype(np.int64)
        k = self.num_classes
        for name, arr in (("predicted", p), ("target", t)):
            if arr.size and (arr.min() < 0 or arr.max() >= k):
                raise UserInputError(f"{name} class ids must lie in [0, {k}) (or be the ignore value "
                                     f"{self.ignore_index} in targets), got {int(arr.min())}..{int(arr.max())}")
        self.confusion += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def merge(self, other: SegmentationMetric) -> SegmentationMetric:
        """A new accumulator with both confusion matrices added."""
        _check_same_kind(self, other)
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge segmentation metrics with different classes or ignore values")
        return SegmentationMetric(self.num_classes, self.ignore_index, self.confusion + other.confusion)

    def result(self) -> dict[str, Any]:
        """``{"miou", "pixel_accuracy", "per_class_iou", "pixels"}`` (NaN without any scored pixel)."""
        c = self.confusion.astype(np.float64)
        inter = np.diag(c)
        union = c.sum(axis=0) + c.sum(axis=1) - inter
        present = union > 0
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=present)
        total = c.sum()
        return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
                "pixel_accuracy": float(inter.sum() / total) if total else float("nan"),
                "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present, strict=True)],
                "pixels": int(total)}


def _sequence(values: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    """One label sequence as a tuple of ints, negative padding dropped."""
    arr = np.asarray(values).ravel()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UserInputError(f"label sequences must hold integer class ids, got {arr.dtype}")
    return tuple(int(v) for v in arr if v >= 0)


@dataclass
class SequenceMetric:
    """Character (element) error rate and exact-sequence accuracy (see the module docstring)."""

    edits: int = 0
    length: int = 0
    exact_count: int = 0
    sequences: int = 0

    def update(self, predicted: Iterable[Sequence[int]], target: Iterable[Sequence[int]]) -> None:
        """Add pairs of sequences (lists, tuples or -1 padded rows of an array), in the same order."""
        preds, tgts = [_sequence(p) for p in predicted], [_sequence(t) for t in target]
        if len(preds) != len(tgts):
            raise UserInputError(f"{len(preds)} predicted sequences for {len(tgts)} targets")
        distance = _require("editdistance", "sequence error rates").eval
        for p, t in zip(preds, tgts, strict=True):
            self.edits += int(distance(p, t))
            self.length += len(t)
            self.exact_count += p == t
        self.sequences += len(tgts)

    def merge(self, other: SequenceMetric) -> SequenceMetric:
        """A new accumulator with both sets of counts added."""
        _check_same_kind(self, other)
        return SequenceMetric(self.edits + other.edits, self.length + other.length,
                              self.exact_count + other.exact_count, self.sequences + other.sequences)

    def result(self) -> dict[str, Any]:
        """``{"cer", "exact", "sequences"}`` (NaN exact without sequences)."""
        cer = self.edits / self.length if self.length else (0.0 if self.edits == 0 else float("inf"))
        return {"cer": cer, "exact": self.exact_count / self.sequences if self.sequences else float("nan"),
                "sequences": self.sequences}


METRICS: dict[str, type] = {"sequence": SequenceMetric, "map": SegmentationMetric, "yolo": DetectionMetric}
"""Output kind -> metric accumulator (``classes`` is scored by :func:`pipeline.evaluation.evaluate.evaluate`)."""


def new_metric(kind: str, num_classes: int | None = None) -> Any:
    """An empty accumulator for an output kind (``num_classes`` needed by ``map`` and ``yolo``)."""
    if kind not in METRICS:
        raise UserInputError(f"no dense metric for output kind {kind!r}; choose one of {', '.join(METRICS)}")
    if kind == "sequence":
        return SequenceMetric()
    if not num_classes or num_classes < 1:
        raise UserInputError(f"the {kind!r} metric needs the number of classes")
    return METRICS[kind](num_classes)


def merge_all(parts: Iterable[Any]) -> Any:
    """The merge of accumulators of one kind (e.g. one per shard), in order."""
    items = list(parts)
    if not items:
        raise ValueError("nothing to merge")
    out = items[0]
    for part in items[1:]:
        out = out.merge(part)
    return out
