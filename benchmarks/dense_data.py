"""Canvases of real MNIST digits for the three dense benchmark tasks (deterministic, seeded; numpy + Pillow).

Digits come from the shipped ``pipeline/assets/mnist10k.npz``: training canvases use samples 0..7999 only, held-out
test canvases samples 8000..9999 only. Every canvas is uint8, one channel, black background; digits are resized
with Pillow (bilinear) and composited with ``max`` (overlapping strokes merge as ink would).

* ``seq`` (:func:`make_seq`): 32 x 128 lines of 1-6 digits, heights 16-28 px, gaps of -2..6 px, each digit moved
  up or down at random, light Gaussian noise. Label: the digits as CTC classes ``digit + 1`` (blank 0), a ``(N, 6)``
  array padded with -1 (``--label-format text``).
* ``det`` (:func:`make_det`): 96 x 96 canvases with 1-5 digits of side 16-44 px (placed with IoU < 0.1 between
  them) on clutter: 3-8 fragments (7-12 px crops of other digits, unlabelled). Label: per canvas a ``(G, 5)`` array
  ``[x1, y1, x2, y2, class]`` of the tight boxes of the digits' ink (pixels >= 32), in pixels.
* ``seg`` (:func:`make_seg`): 64 x 64 canvases with 2-4 digits of side 18-34 px. Label: ``(N, 64, 64)`` class map,
  ``digit + 1`` on the digit's stroke pixels (>= 128; the digit drawn later wins), 0 background, and 255 (ignored)
  on the soft edges (32..127) that no stroke claims.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.datasets import mnist_path
from pipeline.data.npz import MNIST_TRAIN

SEQ_SHAPE, SEQ_MAX = (32, 128), 6
DET_SIZE, SEG_SIZE = 96, 64
IGNORE = 255


@functools.lru_cache(maxsize=2)
def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits of a split (``train``: samples 0..7999, ``test``: 8000..9999) as read-only uint8 images and
    labels."""
    with np.load(mnist_path()) as data:
        x, y = data["x"], data["y"].astype(np.int64)
    part = slice(0, MNIST_TRAIN) if split == "train" else slice(MNIST_TRAIN, None)
    out = x[part], y[part]
    for arr in out:
        arr.setflags(write=False)
    return out


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), np.uint8)


def _noisy(canvas: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    out = canvas.astype(np.float32) + rng.normal(0.0, rng.uniform(0, sigma), canvas.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_seq(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digit lines and their label sequences (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pool, labels = digits(split)
    height, width = SEQ_SHAPE
    x = np.zeros((n, 1, height, width), np.uint8)
    y = np.full((n, SEQ_MAX), -1, np.int64)
    for i in range(n):
        count = int(rng.integers(1, SEQ_MAX + 1))
        picks = rng.integers(len(pool), size=count)
        size = int(rng.integers(16, 29))
        gaps = rng.integers(-2, 7, size=count)
        while count * size + gaps[1:].sum() > width - 2 and size > 12:
            size -= 1
        left = int(rng.integers(0, max(1, width - (count * size + gaps[1:].sum())) + 1))
        for j, k in enumerate(picks):
            top = int(np.clip((height - size) // 2 + rng.integers(-3, 4), 0, height - size))
            x0 = min(left, width - size)
            region = x[i, 0, top:top + size, x0:x0 + size]
            np.maximum(region, _resized(pool[k], size, size), out=region)
            left = x0 + size + int(gaps[(j + 1) % count])
        y[i, :count] = labels[picks] + 1
        x[i, 0] = _noisy(x[i, 0], rng, 12.0)
    return x, y


def _ink_box(digit: np.ndarray, x0: int, y0: int, cls: int) -> tuple[float, ...]:
    rows, cols = np.nonzero(digit >= 32)
    return (float(x0 + cols.min()), float(y0 + rows.min()), float(x0 + cols.max() + 1), float(y0 + rows.max() + 1),
            float(cls))


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_det(n: int, seed: int, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` cluttered canvases and their boxes ``[x1, y1, x2, y2, class]`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pool, labels = digits(split)
    x = np.zeros((n, 1, DET_SIZE, DET_SIZE), np.uint8)
    boxes: list[np.ndarray] = []
    for i in range(n):
        canvas = x[i, 0]
        for _ in range(int(rng.integers(3, 9))):  # clutter: crops of digits, no label
            side = int(rng.integers(7, 13))
            src = pool[int(rng.integers(len(pool)))]
            sy, sx = rng.integers(0, 28 - side, size=2)
            ty, tx = rng.integers(0, DET_SIZE - side, size=2)
            region = canvas[ty:ty + side, tx:tx + side]
            np.maximum(region, src[sy:sy + side, sx:sx + side], out=region)
        placed: list[tuple[float, ...]] = []
        for _ in range(int(rng.integers(1, 6))):
            k = int(rng.integers(len(pool)))
            for _try in range(20):
                side = int(rng.integers(16, 45))
                ty, tx = (int(v) for v in rng.integers(0, DET_SIZE - side + 1, size=2))
                digit = _resized(pool[k], side, side)
                box = _ink_box(digit, tx, ty, int(labels[k]))
                if all(_box_iou(box, b) < 0.1 for b in placed):
                    region = canvas[ty:ty + side, tx:tx + side]
                    np.maximum(region, digit, out=region)
                    placed.append(box)
                    break
        x[i, 0] = _noisy(canvas, rng, 10.0)
        boxes.append(np.array(placed, np.float64).reshape(-1, 5))
    return x, boxes


def make_seg(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases and their class maps (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pool, labels = digits(split)
    x = np.zeros((n, 1, SEG_SIZE, SEG_SIZE), np.uint8)
    y = np.zeros((n, SEG_SIZE, SEG_SIZE), np.uint8)
    for i in range(n):
        soft = np.zeros((SEG_SIZE, SEG_SIZE), bool)
        for _ in range(int(rng.integers(2, 5))):
            k = int(rng.integers(len(pool)))
            side = int(rng.integers(18, 35))
            ty, tx = (int(v) for v in rng.integers(0, SEG_SIZE - side + 1, size=2))
            digit = _resized(pool[k], side, side)
            region = x[i, 0, ty:ty + side, tx:tx + side]
            np.maximum(region, digit, out=region)
            y[i, ty:ty + side, tx:tx + side][digit >= 128] = labels[k] + 1
            soft[ty:ty + side, tx:tx + side] |= (digit >= 32) & (digit < 128)
        y[i][soft & (y[i] == 0)] = IGNORE
        x[i, 0] = _noisy(x[i, 0], rng, 10.0)
    return x, y


def write_yolo(root: Path, split: str, x: np.ndarray, boxes: Sequence[np.ndarray]) -> None:
    """The Ultralytics layout: ``images/<split>/<i>.png`` and ``labels/<split>/<i>.txt`` (``cls cx cy w h``
    normalised to [0, 1]), and ``annotations/instances_<split>.json`` (COCO instances, ``xywh`` pixels, category
    ids = class ids, names the digits)."""
    from PIL import Image

    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    size = x.shape[-1]
    images, annotations = [], []
    for i, (image, rows) in enumerate(zip(x, boxes, strict=True)):
        stem = f"{i:06d}"
        Image.fromarray(image[0]).save(root / "images" / split / f"{stem}.png")
        lines = [f"{int(c)} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} "
                 f"{(y2 - y1) / size:.6f}" for x1, y1, x2, y2, c in rows]
        (root / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        images.append({"id": i, "file_name": f"{stem}.png", "width": size, "height": x.shape[-2]})
        annotations += [{"id": len(annotations) + j + 1, "image_id": i, "category_id": int(c),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                        for j, (x1, y1, x2, y2, c) in enumerate(rows)]
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": c, "name": str(c)} for c in range(10)]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def read_coco_boxes(path: Path) -> list[np.ndarray]:
    """Per image (by id, 0..N-1) the ``[x1, y1, x2, y2, class]`` boxes of a COCO instances file written above."""
    doc = json.loads(path.read_text())
    out: list[list[list[float]]] = [[] for _ in doc["images"]]
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        out[ann["image_id"]].append([x, y, x + w, y + h, ann["category_id"]])
    return [np.array(rows, np.float64).reshape(-1, 5) for rows in out]
