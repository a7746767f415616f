"""Three dense tasks trained here on CPU, for the selection benchmark of issue 27 (``benchmarks/dense_selection.py``).

Data: :mod:`benchmarks.dense_data` (canvases of real MNIST digits; training canvases from samples 0..7999, held-out
test canvases from 8000..9999 only). Models (small CNNs, BatchNorm + ReLU, exported with the legacy exporter, opset
17, dynamic batch, through :func:`pipeline.model.export.export_torch`, i.e. canonicalized and checked against torch):

* ``seq``: CRNN-style CTC recognizer; input ``[N, 1, 32, 128]``; the width axis becomes 32 time steps (a pool over
  the height, a 1x1 conv to K = 11 classes, blank 0); output ``[N, 32, 11]`` softmax (time axis as PP-OCR exports it).
  Trained with CTC loss. Held-out metric: CER and exact-sequence accuracy of best-path decoding.
* ``det``: anchor-free two-scale detector (strides 8 and 16, 12 x 12 + 6 x 6 = 180 anchors); output in the
  Ultralytics deployment format ``[N, 4 + 10, 180]``: ``cx, cy, w, h`` in input pixels (distances to the four box
  sides ``softplus(raw) * stride`` from the cell centre) and sigmoid class scores. Trained with BCE on the class
  scores (a cell is positive for the smallest box whose centre region, 1.5 strides, holds it, at the box's scale) and
  a GIoU loss on positives. Held-out metric: COCO mAP@0.5 and mAP@0.5:0.95 (:class:`pipeline.evaluation.metrics.DetectionMetric`)
  after the decoding below (score >= 0.001, the 300 best candidates, class-wise NMS at IoU 0.6, 100 per image).
* ``seg``: encoder-decoder (ConvTranspose upsampling, bilinear Resize upsampling, concatenated skips) with an output
  at stride 2 resized bilinearly to the input: ``[N, 11, 64, 64]`` logits (class 0 background, ``digit + 1``).
  Cross-entropy (255 ignored). Held-out metric: mIoU and pixel accuracy (:class:`pipeline.evaluation.metrics.SegmentationMetric`).

The decoders here (:func:`decode_yolo`, argmax, :func:`benchmarks.ocr_data.ctc_greedy`) are the benchmark's own
until ``pipeline/data/outputs.py`` (issue 27, core) lands; they follow the same conventions.

Everything is seeded (``torch.manual_seed``, numpy generators, a fixed thread count), so a rebuild gives the same
models. ``ensure_task(name)`` returns the cached model and data under ``work/dense/`` and rebuilds what is missing.
Files per task: ``<task>.onnx``, ``<task>.npz`` (``x_train``/``x_test`` uint8 NCHW; ``y_train``/``y_test`` for
``seq`` (-1 padded sequences) and ``seg`` (class maps, 255 ignored)); ``det/`` in the Ultralytics layout
(``images/{train,test}``, ``labels/{train,test}``) with ``annotations/instances_{train,test}.json`` (COCO).

Run: ``python -m benchmarks.dense_tasks [--tasks seq det seg] [--force]`` (writes
``benchmarks/results/dense_tasks.json``: held-out metrics, training time, machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import dense_data
from graph_ops.io import atomic_write_bytes

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "dense"
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("seq", "det", "seg")
THREADS = 2
NUM_DIGITS = 10
SIZES = {"seq": (3000, 500), "det": (1200, 500), "seg": (2000, 500)}  # training / test canvases
EPOCHS = {"seq": 6, "det": 6, "seg": 6}
STRIDES = (8, 16)
DET_SCORE, DET_IOU, DET_MAX, DET_CANDIDATES = 0.001, 0.6, 100, 300


def _nn() -> Any:
    import torch.nn as nn

    return nn


def block(cin: int, cout: int) -> Any:
    """3x3 conv (no bias), BatchNorm, ReLU."""
    nn = _nn()
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def build(task: str) -> Any:
    """The task's torch module (seeded by the caller)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F  # noqa: N812

    class SeqNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 48),
                                      block(48, 48), nn.MaxPool2d((2, 1)), block(48, 64), nn.AvgPool2d((4, 1)))
            self.head = nn.Conv2d(64, NUM_DIGITS + 1, 1)

        def logits(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, K]
            return self.head(self.body(x)).squeeze(2).permute(0, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits(x).softmax(-1)

    class DetNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 48),
                                      nn.MaxPool2d(2), block(48, 48))
            self.down = nn.Sequential(nn.MaxPool2d(2), block(48, 64))
            self.neck3, self.neck4 = block(48, 48), block(64, 48)
            self.head3, self.head4 = nn.Conv2d(48, 4 + NUM_DIGITS, 1), nn.Conv2d(48, 4 + NUM_DIGITS, 1)
            for head in (self.head3, self.head4):  # class prior 0.01 (RetinaNet's start): no flood of negatives
                nn.init.constant_(head.bias[4:], -4.6)
            size = dense_data.DET_SIZE
            points, strides = [], []
            for s in STRIDES:
                g = (torch.arange(size // s, dtype=torch.float32) + 0.5) * s
                yy, xx = torch.meshgrid(g, g, indexing="ij")
                points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)]))
                strides.append(torch.full(((size // s) ** 2,), float(s)))
            self.register_buffer("points", torch.cat(points, 1))  # [2, A]
            self.register_buffer("strides", torch.cat(strides))  # [A]

        def raw(self, x: torch.Tensor) -> torch.Tensor:  # [N, 4 + K, A]
            p3 = self.stem(x)
            p4 = self.down(p3)
            a = self.head3(self.neck3(p3))
            b = self.head4(self.neck4(p4))
            return torch.cat([a.flatten(2), b.flatten(2)], 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raw = self.raw(x)
            ltrb = F.softplus(raw[:, :4]) * self.strides
            centre = self.points + (ltrb[:, 2:4] - ltrb[:, 0:2]) / 2
            return torch.cat([centre, ltrb[:, 0:2] + ltrb[:, 2:4], raw[:, 4:].sigmoid()], 1)

    class SegNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.e3, self.e4 = block(1, 16), block(16, 32), block(32, 48), block(48, 64)
            self.pool = nn.MaxPool2d(2)
            self.up1 = nn.ConvTranspose2d(64, 48, 2, stride=2)
            self.d3, self.d2 = block(96, 48), block(80, 32)
            self.head = nn.Conv2d(32, NUM_DIGITS + 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e2 = self.e2(self.pool(self.e1(x)))  # 32 x 32
            e3 = self.e3(self.pool(e2))  # 16 x 16
            d3 = self.d3(torch.cat([F.relu(self.up1(self.e4(self.pool(e3)))), e3], 1))
            up = F.interpolate(d3, scale_factor=2.0, mode="bilinear", align_corners=False)
            d2 = self.d2(torch.cat([up, e2], 1))
            return F.interpolate(self.head(d2), scale_factor=2.0, mode="bilinear", align_corners=False)

    return {"seq": SeqNet, "det": DetNet, "seg": SegNet}[task]()


# ---------------------------------------------------------------- training

def _det_targets(boxes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per canvas and anchor: the assigned box ``[x1, y1, x2, y2]`` and class (-1 background). A box is assigned at
    stride 8 when its longer side is below 32 px, at 16 when above 24 (both in between); a cell is positive when its
    centre lies in the box and within 1.5 strides of the box centre, or is the box's nearest cell; the smallest box
    wins a cell."""
    size = dense_data.DET_SIZE
    cells = [((np.arange(size // s) + 0.5) * s, s) for s in STRIDES]
    points = np.concatenate([np.stack(np.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2) for g, _ in cells])
    strides = np.concatenate([np.full((size // s) ** 2, s) for _, s in cells])
    a = len(points)
    box_t = np.zeros((len(boxes), a, 4), np.float32)
    cls_t = np.full((len(boxes), a), -1, np.int64)
    for i, rows in enumerate(boxes):
        area = np.full(a, np.inf)
        for x1, y1, x2, y2, c in rows:
            side = max(x2 - x1, y2 - y1)
            ok_scale = ((strides == 8) & (side < 32)) | ((strides == 16) & (side > 24))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            inside = (points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2)
            near = (np.abs(points[:, 0] - cx) < 1.5 * strides) & (np.abs(points[:, 1] - cy) < 1.5 * strides)
            dist = np.hypot(points[:, 0] - cx, points[:, 1] - cy) + np.where(ok_scale, 0, 1e9)
            pos = ok_scale & inside & near
            pos[int(np.argmin(dist))] = True
            pos &= (x2 - x1) * (y2 - y1) < area
            area[pos] = (x2 - x1) * (y2 - y1)
            box_t[i, pos] = (x1, y1, x2, y2)
            cls_t[i, pos] = int(c)
    return box_t, cls_t


def _giou_loss(pred: Any, target: Any) -> Any:
    import torch

    ix1, iy1 = torch.max(pred[:, 0], target[:, 0]), torch.max(pred[:, 1], target[:, 1])
    ix2, iy2 = torch.min(pred[:, 2], target[:, 2]), torch.min(pred[:, 3], target[:, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = area_p + area_t - inter
    hull = (torch.max(pred[:, 2], target[:, 2]) - torch.min(pred[:, 0], target[:, 0])) * \
        (torch.max(pred[:, 3], target[:, 3]) - torch.min(pred[:, 1], target[:, 1]))
    return (1 - inter / union + (hull - union) / hull).mean()


def loss_fn(task: str, model: Any, x: Any, target: Any) -> Any:
    """The task's training loss on one batch (``target`` as :func:`train_targets` gives it)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    if task == "seq":
        log_probs = model.logits(x).log_softmax(-1).permute(1, 0, 2)  # [T, N, K]
        lengths = (target >= 0).sum(1)
        flat = target[target >= 0]
        t = torch.full((x.shape[0],), log_probs.shape[0], dtype=torch.long)
        return F.ctc_loss(log_probs, flat, t, lengths, blank=0, zero_infinity=True)
    if task == "seg":
        return F.cross_entropy(model(x), target, ignore_index=dense_data.IGNORE)
    box_t, cls_t = target
    out = model(x)  # [N, 4 + K, A]
    onehot = F.one_hot(cls_t.clamp(min=0), NUM_DIGITS).float() * (cls_t >= 0).unsqueeze(-1)
    scores = out[:, 4:].permute(0, 2, 1).clamp(1e-6, 1 - 1e-6)
    pos = cls_t >= 0
    n_pos = max(int(pos.sum()), 1)
    cls_loss = F.binary_cross_entropy(scores, onehot, reduction="sum") / n_pos
    cx, cy, w, h = out[:, 0], out[:, 1], out[:, 2], out[:, 3]
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return cls_loss + 2.0 * _giou_loss(boxes[pos], box_t[pos])


def train_targets(task: str, y: Any) -> Any:
    """Training targets as torch tensors (detection: per-anchor box and class)."""
    import torch

    if task == "det":
        box_t, cls_t = _det_targets(y)
        return torch.from_numpy(box_t), torch.from_numpy(cls_t)
    return torch.from_numpy(np.asarray(y).astype(np.int64))


def _batch(target: Any, idx: np.ndarray) -> Any:
    return tuple(t[idx] for t in target) if isinstance(target, tuple) else target[idx]


def train(task: str, x: np.ndarray, y: Any, *, epochs: int, seed: int = 0, batch: int = 64) -> Any:
    """Train the task's model from scratch (AdamW, one-cycle schedule, seeded order); returns it in eval mode."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    model = build(task)
    images = torch.from_numpy(x.astype(np.float32) / 255.0)
    target = train_targets(task, y)
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    rng = np.random.default_rng(seed)
    model.train()
    for epoch in range(epochs):
        order, total = rng.permutation(len(x)), 0.0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = loss_fn(task, model, images[idx], _batch(target, idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        logger.info("%s epoch %d: loss %.4f", task, epoch + 1, total / len(x))
    return model.eval()


# ---------------------------------------------------------------- decoding and held-out metrics

def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; indices kept, highest score first."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter + 1e-12) <= iou]
    return keep


def decode_yolo(output: np.ndarray, score: float = DET_SCORE, iou: float = DET_IOU,
                max_det: int = DET_MAX, max_candidates: int = DET_CANDIDATES) -> list[np.ndarray]:
    """``[N, 4 + K, A]`` (cx, cy, w, h, class scores) -> per image ``(M, 6)`` ``[x1, y1, x2, y2, score, class]``:
    the ``max_candidates`` best (anchor, class) pairs with a score >= ``score``, class-wise NMS (boxes of different
    classes never suppress each other), the ``max_det`` best."""
    out = []
    for pred in output:
        cx, cy, w, h = pred[:4]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float64)
        scores = pred[4:].T
        anchor, cls = np.nonzero(scores >= score)
        s = scores[anchor, cls].astype(np.float64)
        top = np.argsort(-s, kind="stable")[:max_candidates]
        anchor, cls, s = anchor[top], cls[top], s[top]
        shifted = boxes[anchor] + (cls * (4.0 * max(float(np.abs(boxes).max(initial=1.0)), 1.0)))[:, None]
        kept = _nms(shifted, s, iou)[:max_det]
        out.append(np.concatenate([boxes[anchor[kept]], s[kept, None], cls[kept, None]], 1).reshape(-1, 6))
    return out


@dataclass(frozen=True)
class TaskData:
    """A task's files: the ONNX model, the npz (images; labels for seq and seg) and the detection folder."""

    name: str
    model: Path
    npz: Path
    det_root: Path | None = None

    def test_labels(self) -> Any:
        """Held-out labels: sequences, class maps or per-image boxes."""
        if self.det_root is not None:
            return dense_data.read_coco_boxes(self.det_root / "annotations" / "instances_test.json")
        with np.load(self.npz) as data:
            return data["y_test"]

    def test_images(self, limit: int | None = None) -> np.ndarray:
        """Held-out images as float32 model input (``x / 255``)."""
        with np.load(self.npz) as data:
            return data["x_test"][:limit].astype(np.float32) / 255.0


def run_onnx(model: Any, x: np.ndarray, batch: int = 128, threads: int = 1) -> np.ndarray:
    """The model's first output on ``x`` (onnxruntime CPU; ``batch`` samples per call, or the model's static batch)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name, fixed = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else batch  # a static batch: every call that size, the last one padded
    outs = []
    for i in range(0, len(x), batch):
        part = x[i:i + batch]
        pad = np.zeros((batch - len(part), *part.shape[1:]), part.dtype) if isinstance(fixed, int) else part[:0]
        outs.append(session.run(None, {name: np.concatenate([part, pad])})[0][:len(part)])
    return np.concatenate(outs)


def task_metric(task: str, output: np.ndarray, labels: Any) -> dict[str, Any]:
    """Held-out metric of a task from the model's raw outputs (decoded here)."""
    from benchmarks.ocr_data import ctc_greedy
    from pipeline.evaluation.metrics import DetectionMetric, SegmentationMetric, SequenceMetric

    if task == "seq":
        m: Any = SequenceMetric()
        m.update(ctc_greedy(output), labels[:len(output)])
    elif task == "seg":
        m = SegmentationMetric(NUM_DIGITS + 1, ignore_index=dense_data.IGNORE)
        m.update(output.argmax(1), labels[:len(output)].astype(np.int64))
    else:
        m = DetectionMetric(NUM_DIGITS)
        for pred, target in zip(decode_yolo(output), labels, strict=False):
            m.update(pred, target)
    return m.result()


def evaluate_task(data: TaskData, model: Any, limit: int | None = None, threads: int = 1) -> dict[str, Any]:
    """Held-out metric of ``model`` (an ONNX path or ModelProto) on the task's test canvases (first ``limit``)."""
    return task_metric(data.name, run_onnx(model, data.test_images(limit), threads=threads), data.test_labels())


# ---------------------------------------------------------------- building the cache

MAKERS: dict[str, Callable[[int, int, str], tuple[np.ndarray, Any]]] = {
    "seq": dense_data.make_seq, "det": dense_data.make_det, "seg": dense_data.make_seg}


def task_files(task: str, work: Path = WORK) -> TaskData:
    """Where a task's files live (they may not exist yet)."""
    return TaskData(task, work / f"{task}.onnx", work / f"{task}.npz", work / "det" if task == "det" else None)


def write_data(task: str, work: Path = WORK, seed: int = 0) -> tuple[np.ndarray, Any]:
    """Render the task's canvases (training seed ``seed``, test ``seed + 1``) into the cache; returns the training
    images and labels."""
    n_train, n_test = SIZES[task]
    files = task_files(task, work)
    work.mkdir(parents=True, exist_ok=True)
    x_train, y_train = MAKERS[task](n_train, seed, "train")
    x_test, y_test = MAKERS[task](n_test, seed + 1, "test")
    arrays = {"x_train": x_train, "x_test": x_test}
    if task == "det":
        for split, x, boxes in (("train", x_train, y_train), ("test", x_test, y_test)):
            dense_data.write_yolo(files.det_root, split, x, boxes)  # type: ignore[arg-type]
    else:
        arrays |= {"y_train": y_train, "y_test": y_test}
    tmp = files.npz.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(files.npz)
    return x_train, y_train


def ensure_task(task: str, work: Path = WORK, force: bool = False) -> tuple[TaskData, dict[str, Any] | None]:
    """The task's cached files, rebuilt (data, training, export) when missing or ``force``; returns them and the
    build record (None when the cache was used)."""
    from pipeline.model.export import export_torch

    files = task_files(task, work)
    if files.model.exists() and files.npz.exists() and not force:
        return files, None
    start = time.perf_counter()
    x, y = write_data(task, work)
    data_s = time.perf_counter() - start
    model = train(task, x, y, epochs=EPOCHS[task])
    train_s = time.perf_counter() - start - data_s
    import torch

    export_torch(model, torch.from_numpy(x[:2].astype(np.float32) / 255.0), files.model, dynamo=False)
    record = {"train_canvases": SIZES[task][0], "test_canvases": SIZES[task][1], "epochs": EPOCHS[task],
              "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
              "heldout": evaluate_task(files, files.model, threads=THREADS)}
    logger.info("%s: %s", task, record)
    return files, record


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    from pipeline.deployment.bench import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache holds the task")
    parser.add_argument("--out", type=Path, default=RESULTS / "dense_tasks.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("graph_ops").setLevel(logging.WARNING)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    for task in args.tasks:
        files, record = ensure_task(task, args.work, args.force)
        if record is None:
            record = {**doc.get("tasks", {}).get(task, {}), "heldout": evaluate_task(files, files.model)}
        doc.setdefault("tasks", {})[task] = record
        print(f"{task}: {record['heldout']}")
    doc.update(command=" ".join(["python -m benchmarks.dense_tasks", *(sys.argv[1:] if argv is None else argv)]),
               machine=machine_info(), threads=THREADS,
               note="2-core VM shared with other jobs; times are wall-clock under that load")
    atomic_write_bytes(args.out, json.dumps(doc, indent=1, sort_keys=True).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
