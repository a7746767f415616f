"""Dense metrics of a model whose first output is a sequence, a map or detections: decode each batch, feed a metric.

The output kind (:func:`pipeline.data.outputs.detect_output_kind`, or ``--output-kind``) picks the decoder
(:mod:`pipeline.data.outputs`) and the accumulator (:data:`pipeline.evaluation.metrics.METRICS`):

* ``sequence`` (CTC ``[N, T, K]``): best path, repeats merged, blanks dropped (:func:`~pipeline.data.outputs.ctc_collapse`)
  -> CER and exact-sequence accuracy; primary ``exact``.
* ``map`` (``[N, K, H, W]``): per-pixel argmax (a ``K == 1`` probability map thresholded at ``map_threshold``)
  -> mIoU and pixel accuracy; primary ``miou``. A label map of another size than the output's ``H x W`` is scored at
  its own size ``(H', W')``: the predicted class map is resampled to it by nearest pixel centre
  (:func:`resample_classes`: label pixel ``i`` reads output row ``floor((i + 1/2) H / H')``, the same for columns),
  so masks at the input's size work for an output at a stride; ignored pixels (255 in files, -1 in
  :class:`~pipeline.data.labels.TargetSource`) are not scored.
* ``yolo`` (``[N, 4 + K, A]``): detections of :func:`~pipeline.data.outputs.yolo_decode` at a confidence of
  ``MAP_CONF`` = 0.001 (the usual validation setting: mAP integrates over every score, so low-score detections
  belong in it), class-wise NMS at ``iou`` -> COCO mAP@0.5 and mAP@0.5:0.95 (pycocotools); primary ``map50``.

What the decisions are scored against (``against``): ``labels`` when the data has dense labels of the matching kind
(sequences, class maps, boxes: YOLO / COCO files, normalised to the model input and scaled to its pixels), else
``reference``: the reference (original) model's own decisions on the same batch: its decoded sequences, its class
maps, or its detections above ``conf`` (default 0.25, the confident ones, as model labels take them) as ground truth
boxes. A model scored against itself this way gets exact 1, mIoU 1 and mAP 1 (every reference box is matched by the
same box with a higher score than any extra low-score detection, as NMS keeps high-score boxes whatever the
threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from pipeline.data.outputs import (
    OUTPUT_KINDS,
    DecodeOptions,
    ctc_best_path,
    ctc_collapse,
    detect_output_kind,
    map_classes,
    output_classes,
    yolo_decode,
)
from pipeline.errors import UserInputError
from pipeline.evaluation.metrics import SegmentationMetric, new_metric

MAP_CONF = 0.001
"""Confidence above which a YOLO head's detections are scored by mAP (the reference's ground truth uses ``conf``)."""

PRIMARY: dict[str, str] = {"sequence": "exact", "map": "miou", "yolo": "map50"}
"""Output kind -> the metric that is its score (as top-1 is a classifier's)."""

METRIC_NAMES: dict[str, tuple[str, ...]] = {"sequence": ("exact", "cer"), "map": ("miou", "pixel_accuracy"),
                                            "yolo": ("map50", "map50_95")}
"""Output kind -> its metrics (JSON keys; fractions in [0, 1] except ``cer``, which may exceed 1)."""

LOWER_IS_BETTER = frozenset({"cer"})

_LABEL_KIND = {"sequence": "sequence", "map": "map", "yolo": "boxes"}  # output kind -> TargetSource kind


def dense_kind(model: onnx.ModelProto, output_kind: str | None = None) -> str | None:
    """The dense kind of the model's first output (``sequence``, ``map``, ``yolo``), or None for a classifier."""
    kind = output_kind or detect_output_kind(model)
    return None if OUTPUT_KINDS[kind].target == "classes" else kind


def _image_size(feeds: dict[str, np.ndarray]) -> tuple[int, int]:
    for value in feeds.values():
        if np.ndim(value) == 4:
            return int(value.shape[2]), int(value.shape[3])
    raise UserInputError("YOLO boxes are normalised to the image input [N, C, H, W]; this model has none")


def _label_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(m, 5)`` ``class, cx, cy, w, h`` normalised -> ``(m, 5)`` ``x1, y1, x2, y2, class`` in input pixels."""
    b = np.asarray(boxes, np.float64).reshape(-1, 5)
    cx, cy, w, h = b[:, 1] * width, b[:, 2] * height, b[:, 3] * width, b[:, 4] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, b[:, 0]], axis=1)


@dataclass
class DenseScorer:
    """Streams one evaluation's dense metric (module docstring); mutated by :meth:`update` only.

    Attributes:
        kind: ``sequence``, ``map`` or ``yolo``.
        against: ``labels`` or ``reference``.
        decode: the decoder thresholds (``blank``, ``map_threshold``, ``conf``: the reference's boxes, ``iou``).
        num_classes: classes of the decisions (``map``: 2 for a probability map; ``yolo``: detection classes).
        metric: the accumulator of :mod:`pipeline.evaluation.metrics`.
    """

    kind: str
    against: str
    decode: DecodeOptions
    num_classes: int
    metric: Any

    def decisions(self, output: np.ndarray, *, reference: bool = False) -> Any:
        """Decoded decisions of one batch's first output (``reference``: the reference's, as ground truth)."""
        if self.kind == "sequence":
            return ctc_collapse(ctc_best_path(output), self.decode.blank)
        if self.kind == "map":
            return map_classes(output, self.decode.map_threshold)
        options = self.decode if reference else replace(self.decode, conf=MAP_CONF)
        found = yolo_decode(output, options, num_classes=self.num_classes)
        return [d[:, [0, 1, 2, 3, 5]] for d in found] if reference else found

    def update(self, output: np.ndarray, feeds: dict[str, np.ndarray], labels: list[np.ndarray] | None,
               ref_output: np.ndarray | None) -> None:
        """Add one batch: the model's first output and, per ``against``, the data's labels or the reference's."""
        predicted = self.decisions(output)
        if self.against == "reference":
            truth = self.decisions(ref_output, reference=True)
        elif self.kind == "yolo":
            truth = [_label_boxes(b, *_image_size(feeds)) for b in labels or []]
        elif self.kind == "map":
            if labels and any(np.shape(t) != predicted.shape[1:] for t in labels):
                for p, t in zip(predicted, labels, strict=True):  # scored at each label map's own size
                    self.metric.update(resample_classes(p, np.shape(t))[None], np.asarray(t)[None])
                return
            truth = np.stack(labels) if labels else np.zeros((0, *predicted.shape[1:]), np.int64)
        else:
            truth = labels or []
        if self.kind == "yolo":
            for p, t in zip(predicted, truth, strict=True):
                self.metric.update(p, t)
        else:
            self.metric.update(predicted, truth)

    def result(self) -> dict[str, Any]:
        """``{"output_kind", "against", "primary", "score", <metric>: value, ...}`` (JSON-ready)."""
        values = self.metric.result()
        primary = PRIMARY[self.kind]
        return {"output_kind": self.kind, "against": self.against, "primary": primary, "score": values[primary],
                **values}


def dense_scorer(model: onnx.ModelProto, dataset: Any, kind: str, *, with_reference: bool,
                 decode: DecodeOptions | None = None) -> DenseScorer:
    """The scorer of a dense model on ``dataset``: against the data's dense labels of the output's kind, else against
    the reference (``with_reference``), else a UserInputError saying what to give.

    Raises:
        UserInputError: no labels of the kind and no reference; labels of another kind; the ``[metrics]`` extra
            missing (detection, sequences).
    """
    decode = decode or DecodeOptions()
    source = getattr(dataset, "targets", None)
    layout = OUTPUT_KINDS[kind].layout
    if source is not None and source.kind != _LABEL_KIND[kind]:
        raise UserInputError(f"the data's labels are {source.kind} ({source.format}), but the model's first output "
                             f"is {layout} (output kind '{kind}'), scored against {_LABEL_KIND[kind]} labels; give "
                             f"matching labels, or --output-kind if the kind was misread")
    if source is None and not with_reference:
        raise UserInputError(f"the model's first output is {layout} (output kind '{kind}'): scoring it needs "
                             f"{_LABEL_KIND[kind]} labels (--labels-path / --label-format, or a dense y array), or "
                             f"the original model (--reference) whose own decisions are then the ground truth")
    k = output_classes(model, kind)
    if kind == "sequence" and decode.blank >= k:
        raise UserInputError(f"--blank {decode.blank} is not a class of the output ({k} classes)")
    if kind == "map" and source is not None:
        k = max(k, source.num_classes)
    # TargetSource maps: -1 = ignore (255 in files)
    metric = SegmentationMetric(k, ignore_index=-1) if kind == "map" else new_metric(kind, k)
    if kind in ("sequence", "yolo"):  # fail now, not after the first batch, when the extra is missing
        from pipeline.evaluation.metrics import _require

        _require("editdistance" if kind == "sequence" else "pycocotools.cocoeval",
                 "sequence error rates" if kind == "sequence" else "detection mAP")
    return DenseScorer(kind, "labels" if source is not None else "reference", decode, k, metric)


def resample_classes(classes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A class map ``(H, W)`` resampled to ``shape`` ``(H', W')`` by nearest pixel centre (module docstring)."""
    if len(shape) != 2:
        raise UserInputError(f"a label map must be 2-D (H, W), got shape {list(shape)}")
    rows = ((np.arange(shape[0]) + 0.5) * classes.shape[0] / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * classes.shape[1] / shape[1]).astype(np.int64)
    return classes[np.ix_(rows, cols)]
