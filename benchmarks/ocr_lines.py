"""Rendered text lines for the PP-OCRv4 recognizer shipped in rapidocr-onnxruntime (the data of ``ocr_rec_labels``).

Lines: 1-3 words of 2-7 characters drawn uniformly from the recognizer's dictionary (ONNX metadata ``character``, one
character a line; class 0 = blank, then the dictionary, then the space) restricted to the ASCII letters and digits that
every DejaVu font used here draws (its glyph differs from the font's missing-glyph box), single spaces between words; each
line rendered
in black on a light background with one of DejaVu Sans / Serif / Sans Mono / Sans Bold at 22-34 px, a small random
offset and Gaussian pixel noise (sigma 6 on 0-255). Preprocessing is rapidocr's ``TextRecognizer.resize_norm_img``:
BGR order, resize to height 48 keeping the aspect ratio (width ``ceil(48 * w / h)``, at most 320), ``(x / 255 -
0.5) / 0.5``, right-padded with zeros to width 320. Everything is seeded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MODELS = Path("/work/prod/rapidocr_onnxruntime/rapidocr_onnxruntime/models")
MODEL = MODELS / "ch_PP-OCRv4_rec_infer.onnx"
DETECTOR = MODELS / "ch_PP-OCRv4_det_infer.onnx"
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
HEIGHT, WIDTH = 48, 320


def dictionary(model: Path = MODEL) -> list[str]:
    """The recognizer's classes: ``blank``, the dictionary, the space (rapidocr's ``CTCLabelDecode``)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def drawable(chars: list[str]) -> list[str]:
    """The ASCII letters and digits every font of ``FONTS`` draws (not its missing-glyph box)."""
    from PIL import ImageFont

    fonts = [ImageFont.truetype(str(FONT_DIR / f), 28) for f in FONTS]
    missing = [np.asarray(f.getmask("\uffff")).tobytes() for f in fonts]
    out = []
    for ch in chars:
        if len(ch) != 1 or not ch.isalnum() or ord(ch) > 0x7E:
            continue
        if all(np.asarray(f.getmask(ch)).tobytes() not in (m, b"") for f, m in zip(fonts, missing, strict=True)):
            out.append(ch)
    return out


def _preprocess(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` for one RGB uint8 line -> (3, 48, 320) float32."""
    from PIL import Image

    h, w = rgb.shape[:2]
    resized_w = min(WIDTH, math.ceil(HEIGHT * w / h))
    img = np.asarray(Image.fromarray(rgb).resize((resized_w, HEIGHT), Image.BILINEAR), np.float32)
    img = img[:, :, ::-1].transpose(2, 0, 1) / 255.0  # BGR, CHW
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :resized_w] = (img - 0.5) / 0.5
    return out


def render(count: int, seed: int, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """``count`` seeded lines: inputs ``(count, 3, 48, 320)`` and their texts (module docstring)."""
    from PIL import Image, ImageDraw, ImageFont

    chars = drawable(classes[1:-1])
    rng = np.random.default_rng(seed)
    fonts = {(f, s): ImageFont.truetype(str(FONT_DIR / f), s) for f in FONTS for s in range(22, 35)}
    xs, texts = [], []
    for _ in range(count):
        words = ["".join(chars[int(i)] for i in rng.integers(0, len(chars), int(rng.integers(2, 8))))
                 for _ in range(int(rng.integers(1, 4)))]
        text = " ".join(words)
        font = fonts[(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(22, 35)))]
        left, top, right, bottom = font.getbbox(text)
        pad = int(rng.integers(2, 8))
        canvas = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad),
                           tuple(int(v) for v in rng.integers(200, 256, 3)))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=font, fill=tuple(int(v) for v in
                                                                                         rng.integers(0, 60, 3)))
        rgb = np.asarray(canvas, np.float64) + rng.normal(0, 6, (canvas.size[1], canvas.size[0], 3))
        xs.append(_preprocess(np.clip(rgb, 0, 255).astype(np.uint8)))
        texts.append(text)
    return np.stack(xs), texts


def encode(texts: list[str], classes: list[str]) -> np.ndarray:
    """Texts -> ``(N, L)`` class ids padded with -1 (the ``text`` label format)."""
    index = {c: i for i, c in enumerate(classes) if i}
    width = max(len(t) for t in texts)
    out = np.full((len(texts), width), -1, np.int64)
    for i, t in enumerate(texts):
        out[i, :len(t)] = [index[c] for c in t]
    return out


def decode(path: np.ndarray, classes: list[str]) -> list[str]:
    """Greedy CTC paths ``(N, T)`` -> texts (repeats merged, blanks dropped)."""
    from pipeline.data.outputs import ctc_collapse

    return ["".join(classes[c] for c in seq) for seq in ctc_collapse(path, 0)]


def render_pages(count: int, seed: int, classes: list[str], size: int = 320) -> np.ndarray:
    """``count`` seeded ``size x size`` pages for the PP-OCRv4 text detector: 2-5 lines of :func:`render`'s kind
    pasted at random places on a light background, preprocessed as rapidocr's detector does (BGR, ``(x / 255 -
    0.5) / 0.5``), ``(count, 3, size, size)`` float32."""
    from PIL import Image, ImageDraw, ImageFont

    chars = drawable(classes[1:-1])
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(count):
        page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(190, 256, 3)))
        draw = ImageDraw.Draw(page)
        for _ in range(int(rng.integers(2, 6))):
            text = " ".join("".join(chars[int(i)] for i in rng.integers(0, len(chars), int(rng.integers(2, 8))))
                            for _ in range(int(rng.integers(1, 3))))
            font = ImageFont.truetype(str(FONT_DIR / FONTS[int(rng.integers(len(FONTS)))]), int(rng.integers(14, 30)))
            draw.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - 30))), text, font=font,
                      fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
        rgb = np.asarray(page, np.float64) + rng.normal(0, 6, (size, size, 3))
        pages.append(((np.clip(rgb, 0, 255)[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5).astype(np.float32))
    return np.stack(pages)
