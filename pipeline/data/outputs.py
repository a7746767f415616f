"""What a model's output means, and the decoders that turn it into decisions (labels from the model, metrics).

``OUTPUT_KINDS`` is the registry (a plain dict; it also feeds ``--output-kind``). Each kind names the shape of the
model's first output, what calibration pairs features with, and its decoder:

* ``classes``: ``[N, K]`` class scores; the decision is ``argmax`` per sample (numpy's argmax: the first maximum).
* ``sequence``: ``[N, T, K]`` per-time-step class scores of a CTC head (probabilities or logits); the decision is the
  best path ``argmax`` per time step (:func:`ctc_best_path`); :func:`ctc_collapse` turns a path into the recognised
  sequence (repeats merged, then blanks dropped; what sequence metrics compare) and :func:`ctc_align` aligns a known
  target sequence to the time steps (forced alignment: the Viterbi path of the CTC topology through the model's own
  per-step log-probabilities, so every time step gets the class the model spends it on, the blank included).
* ``map``: ``[N, K, H, W]`` score maps; ``K >= 2``: ``argmax`` over ``K`` per pixel; ``K == 1`` (a probability map,
  e.g. a DBNet text detector or any sigmoid output): class 1 where the value exceeds ``threshold`` (default
  ``MAP_THRESHOLD`` = 0.5), else 0; a map whose values leave ``[0, 1]`` is read as logits, thresholded at
  ``log(t / (1 - t))`` (the same decision after a sigmoid). See :func:`map_classes`.
* ``yolo``: ``[N, 4 + K, A]`` (ultralytics v8/11 export: per anchor ``cx, cy, w, h`` in input pixels, then ``K``
  class scores already through a sigmoid; a segmentation export has ``nm`` mask coefficients after the scores and a
  second output ``[N, nm, h, w]``); the decisions are the detections of :func:`yolo_decode`: per anchor the best
  class and its score, kept above ``conf`` (default ``YOLO_CONF`` = 0.25), class-wise non-maximum suppression at IoU
  ``iou`` (default ``YOLO_IOU`` = 0.7; greedy, highest score first), at most ``YOLO_MAX_DET`` = 300 per image (the
  ultralytics defaults of ``predict``).

Detection (:func:`detect_output_kind`) reads the declared shape of the first output and the model's input size and
refuses to guess: rank 2 is ``classes``, rank 4 ``map``; rank 3 is ``yolo`` when its last axis counts exactly the cells
of a pyramid of strides (``A = sum_s (H/s)(W/s)`` over consecutive strides of 4, 8, 16, 32, 64, 128), else ``sequence``,
unless it looks like a detector laid out otherwise (anchors on axis 1, or three anchors per cell), which is refused
with a request for ``--output-kind``. Dynamic sizes that the rules need are refused the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from pipeline.errors import CalibrationError, UserInputError

MAP_THRESHOLD = 0.5
YOLO_CONF = 0.25
YOLO_IOU = 0.7
YOLO_MAX_DET = 300
YOLO_MAX_CANDIDATES = 30000
STRIDES = (4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class OutputKind:
    """One way of reading a model's first output.

    Attributes:
        name: the registry key (``--output-kind``).
        target: what calibration pairs features with: ``classes`` (one class per image), ``sequence`` (a class per
            time step), ``map`` (a class per pixel) or ``boxes`` (detections, rasterised per location).
        layout: the output's layout, for messages.
    """

    name: str
    target: str
    layout: str


OUTPUT_KINDS: dict[str, OutputKind] = {
    "classes": OutputKind("classes", "classes", "[N, K] class scores"),
    "sequence": OutputKind("sequence", "sequence", "[N, T, K] per-step class scores of a CTC head"),
    "map": OutputKind("map", "map", "[N, K, H, W] score maps (K == 1: a probability map)"),
    "yolo": OutputKind("yolo", "boxes", "[N, 4 + K, A] ultralytics v8/11 detections"),
}


@dataclass(frozen=True)
class DecodeOptions:
    """Thresholds of the decoders (module docstring)."""

    blank: int = 0
    map_threshold: float = MAP_THRESHOLD
    conf: float = YOLO_CONF
    iou: float = YOLO_IOU

    def __post_init__(self) -> None:
        if self.blank < 0:
            raise UserInputError(f"--blank is a class index >= 0, got {self.blank}")
        for name, value in (("--map-threshold", self.map_threshold), ("--conf-threshold", self.conf),
                            ("--iou-threshold", self.iou)):
            if not 0.0 < value < 1.0:
                raise UserInputError(f"{name} is a number in (0, 1), got {value}")


# ------------------------------------------------------------------------------------------------------ detection


def _dims(info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in info.type.tensor_type.shape.dim)


def input_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """``(H, W)`` of the model's first image-like input ``[N, C, H, W]`` when static, else None."""
    weights = {init.name for init in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        dims = _dims(vi)
        if len(dims) == 4 and dims[2] is not None and dims[3] is not None:
            return int(dims[2]), int(dims[3])
        return None
    return None


def pyramid_cells(height: int, width: int) -> dict[int, tuple[int, ...]]:
    """Cell counts ``sum_s (H/s)(W/s)`` of every run of consecutive strides of ``STRIDES`` that divide the input ->
    the strides."""
    found: dict[int, tuple[int, ...]] = {}
    for first in range(len(STRIDES)):
        total = 0
        for last in range(first, len(STRIDES)):
            s = STRIDES[last]
            if height % s or width % s:
                break
            total += (height // s) * (width // s)
            if last > first:
                found.setdefault(total, STRIDES[first:last + 1])
    return found


def mask_coefficients(model: onnx.ModelProto) -> int:
    """``nm`` of a YOLO segmentation export (its second output ``[N, nm, h, w]``), else 0."""
    if len(model.graph.output) < 2:
        return 0
    dims = _dims(model.graph.output[1])
    return int(dims[1]) if len(dims) == 4 and dims[1] is not None else 0


def detect_output_kind(model: onnx.ModelProto) -> str:
    """The kind of the model's first output (module docstring), or a UserInputError asking for ``--output-kind``."""
    out = model.graph.output[0]
    dims = _dims(out)
    ask = f"say what it is with --output-kind ({', '.join(OUTPUT_KINDS)})"
    if len(dims) == 2:
        return "classes"
    if len(dims) == 4:
        return "map"
    if len(dims) != 3:
        raise UserInputError(f"cannot tell what output '{out.name}' of shape {list(dims)} means (not [N, K], "
                             f"[N, T, K], [N, K, H, W] or [N, 4 + K, A]); {ask}, or give labelled data")
    hw = input_size(model)
    if dims[1] is None or dims[2] is None or hw is None:
        raise UserInputError(f"output '{out.name}' has shape {list(dims)} and the input size is not static: it "
                             f"could be a CTC head [N, T, K] or a detector [N, 4 + K, A]; {ask} (or fix the input "
                             f"size with --input-shape)")
    cells = pyramid_cells(*hw)
    if dims[2] in cells and dims[1] >= 5 + mask_coefficients(model):
        return "yolo"
    if dims[1] in cells or any(dims[i] == 3 * c for c in cells for i in (1, 2)):
        raise UserInputError(f"output '{out.name}' of shape {list(dims)} looks like a detector laid out other than "
                             f"ultralytics v8/11 ([N, 4 + K, A]); only that layout is read; {ask}")
    return "sequence"


def output_classes(model: onnx.ModelProto, kind: str) -> int:
    """Classes the decisions of the model's first output take: ``K`` (``classes``, ``sequence``, ``map`` with
    ``K >= 2``), 2 for a probability map, the ``K`` detection classes of a ``yolo`` head."""
    dims = _dims(model.graph.output[0])
    where = f"output '{model.graph.output[0].name}' {list(dims)}"
    axis = {"classes": 1, "sequence": 2, "map": 1, "yolo": 1}[kind]
    rank = {"classes": 2, "sequence": 3, "map": 4, "yolo": 3}[kind]
    if len(dims) != rank or dims[axis] is None:
        raise UserInputError(f"{where} is not {OUTPUT_KINDS[kind].layout} with a static class axis (--output-kind "
                             f"{kind})")
    k = int(dims[axis])
    if kind == "map":
        return max(k, 2)
    if kind == "yolo":
        k -= 4 + mask_coefficients(model)
        if k < 1:
            raise UserInputError(f"{where} has no class scores after the 4 box coordinates")
    return k


# ------------------------------------------------------------------------------------------------------ decoders


def argmax_classes(scores: np.ndarray) -> np.ndarray:
    """``[N, K]`` -> ``(N,)`` int64."""
    return np.asarray(scores).argmax(axis=1).astype(np.int64)


def ctc_best_path(scores: np.ndarray) -> np.ndarray:
    """``[N, T, K]`` -> ``(N, T)`` int64: the most likely class of every time step."""
    return np.asarray(scores).argmax(axis=2).astype(np.int64)


def ctc_collapse(path: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Best paths ``(N, T)`` -> the recognised sequences: consecutive repeats merged, then blanks dropped."""
    out = []
    for row in np.asarray(path):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(c) for c in row[keep] if c != blank])
    return out


def log_probs(scores: np.ndarray) -> np.ndarray:
    """Per-step log-probabilities of ``[N, T, K]`` scores: ``log`` of probabilities (every row in ``[0, 1]`` summing
    to 1 within 1e-3), else ``log_softmax`` of logits; float64."""
    s = np.asarray(scores, np.float64)
    if s.size and s.min() >= 0.0 and s.max() <= 1.0 and np.allclose(s.sum(axis=-1), 1.0, atol=1e-3):
        return np.log(np.maximum(s, 1e-30))
    shifted = s - s.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ctc_align(scores: np.ndarray, targets: np.ndarray | Sequence[Sequence[int]], blank: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Forced alignment of target sequences to the time steps of a CTC output.

    Args:
        scores: ``[N, T, K]`` per-step probabilities or logits (:func:`log_probs`).
        targets: per sample the class ids of its sequence (rows of ``(N, L)`` padded with negative values, or
            lists); blanks in a target are refused.
        blank: the blank class.

    Returns:
        ``(N, T)`` int64 labels: the class each time step spends on the most likely path (Viterbi) through the CTC
        topology of the target (``blank, c1, blank, c2, ..., blank``; a step may stay, advance by one, or skip a
        blank between two different classes), and a boolean ``(N,)``: whether the target fitted into ``T`` steps. A
        target that does not fit (``len + repeated neighbours > T``) gets the best path instead (its flag is False).
    """
    lp = log_probs(scores)
    n, steps, k = lp.shape
    rows = [[int(c) for c in np.asarray(t).reshape(-1) if c >= 0] for t in targets]
    if len(rows) != n:
        raise CalibrationError(f"{len(rows)} target sequences for {n} outputs")
    if any(c == blank or c >= k for row in rows for c in row):
        raise CalibrationError(f"target sequences must hold class ids 0..{k - 1} other than the blank ({blank})")
    out = ctc_best_path(lp)
    fits = np.array([len(r) + sum(a == b for a, b in itertools.pairwise(r)) <= steps for r in rows], bool)
    for i in range(n):
        if not rows[i]:
            out[i] = blank  # an empty target: every step is the blank
    todo = [i for i in range(n) if fits[i] and rows[i]]
    if not todo:
        return out, fits
    width = 2 * max(len(rows[i]) for i in todo) + 1
    ext = np.full((len(todo), width), blank, np.int64)
    length = np.zeros(len(todo), np.int64)
    for j, i in enumerate(todo):
        ext[j, 1:2 * len(rows[i]):2] = rows[i]
        length[j] = 2 * len(rows[i]) + 1
    valid = np.arange(width)[None, :] < length[:, None]
    skip = np.zeros_like(valid)  # state s may come from s - 2: a class different from the one two states back
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    emit = np.take_along_axis(lp[todo], ext[:, None, :], axis=2)  # (n, T, S)
    score = np.full((len(todo), width), -np.inf)
    score[:, :2] = emit[:, 0, :2]
    score[~valid] = -np.inf
    back = np.zeros((len(todo), steps, width), np.int8)  # 0: stay, 1: from s - 1, 2: from s - 2
    for t in range(1, steps):
        one = np.concatenate([np.full((len(todo), 1), -np.inf), score[:, :-1]], axis=1)
        two = np.concatenate([np.full((len(todo), 2), -np.inf), score[:, :-2]], axis=1)
        two[~skip] = -np.inf
        choice = np.stack([score, one, two])
        back[:, t] = choice.argmax(axis=0)
        score = choice.max(axis=0) + emit[:, t]
        score[~valid] = -np.inf
    rows_idx = np.arange(len(todo))
    last = np.where(score[rows_idx, length - 1] >= score[rows_idx, length - 2], length - 1, length - 2)
    state = last
    path = np.zeros((len(todo), steps), np.int64)
    for t in range(steps - 1, -1, -1):
        path[:, t] = ext[rows_idx, state]
        state = state - back[rows_idx, t, state]
    out[todo] = path
    return out, fits


def map_classes(scores: np.ndarray, threshold: float = MAP_THRESHOLD) -> np.ndarray:
    """``[N, K, H, W]`` -> ``(N, H, W)`` int64 per-pixel decisions (module docstring)."""
    s = np.asarray(scores)
    if s.ndim != 4:
        raise CalibrationError(f"a map output is [N, K, H, W], got shape {list(s.shape)}")
    if s.shape[1] >= 2:
        return s.argmax(axis=1).astype(np.int64)
    v = s[:, 0]
    if v.size and (v.min() < 0.0 or v.max() > 1.0):  # logits: the same decision as sigmoid(v) > threshold
        return (v > math.log(threshold / (1.0 - threshold))).astype(np.int64)
    return (v > threshold).astype(np.int64)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corner boxes ``a (n, 4)`` against ``b (m, 4)`` (``x1, y1, x2, y2``) -> ``(n, m)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = YOLO_IOU,
        max_det: int = YOLO_MAX_DET) -> np.ndarray:
    """Class-wise greedy non-maximum suppression: indices of the kept boxes, highest score first (a box is dropped
    when its IoU with a kept box of the same class exceeds ``iou``)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_det:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        same = classes[rest] == classes[i]
        overlap = box_iou(boxes[i:i + 1], boxes[rest])[0] > iou
        order = rest[~(same & overlap)]
    return np.asarray(keep, np.int64)


def yolo_decode(output: np.ndarray, options: DecodeOptions | None = None, *, num_classes: int | None = None,
                ) -> list[np.ndarray]:
    """Detections of an ultralytics v8/11 head ``[N, 4 + K (+ nm), A]`` (module docstring).

    Returns:
        Per image ``(m, 6)`` float64 rows ``x1, y1, x2, y2, score, class`` in input pixels, highest score first.
    """
    options = options or DecodeOptions()
    out = np.asarray(output, np.float64)
    if out.ndim != 3 or out.shape[1] < 5:
        raise CalibrationError(f"a YOLO output is [N, 4 + K, A], got shape {list(out.shape)}")
    k = out.shape[1] - 4 if num_classes is None else num_classes
    found = []
    for image in out:
        scores = image[4:4 + k]
        cls = scores.argmax(axis=0)
        conf = scores[cls, np.arange(image.shape[1])]
        idx = np.flatnonzero(conf > options.conf)
        if idx.size > YOLO_MAX_CANDIDATES:
            idx = idx[np.argsort(-conf[idx], kind="stable")[:YOLO_MAX_CANDIDATES]]
        cx, cy, w, h = image[:4, idx]
        corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        kept = nms(corners, conf[idx], cls[idx], options.iou)
        found.append(np.concatenate([corners[kept], conf[idx][kept, None], cls[idx][kept, None]], axis=1)
                     if kept.size else np.zeros((0, 6)))
    return found


def detections_as_boxes(detections: Sequence[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    """Detections ``(m, 6)`` in input pixels -> ``(m, 5)`` rows ``class, cx, cy, w, h`` normalised to the input
    (the label convention of :mod:`pipeline.data.targets`), clipped to the image."""
    out = []
    scale = np.array([width, height, width, height], np.float64)
    for det in detections:
        xyxy = np.clip(det[:, :4] / scale, 0.0, 1.0)
        centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
        size = xyxy[:, 2:] - xyxy[:, :2]
        out.append(np.concatenate([det[:, 5:6], centre, size], axis=1))
    return out
