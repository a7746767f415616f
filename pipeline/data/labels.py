"""Dense labels of a dataset, read from ``.npz`` arrays or label files: :class:`TargetSource` (what
``pipeline.data.datasets.Dataset.targets`` holds) and its readers.

Per sample: ``map`` an int64 ``(H, W)`` class map (``-1`` = ignore; 255 in files), ``boxes`` float64 ``(m, 5)`` rows
``class, cx, cy, w, h`` normalised to the model input, ``sequence`` int64 ``(L,)`` class ids.

* ``.npz`` array ``y``: ``(N,)`` per-image classes (not a target source: ``Dataset.labels``); ``(N, H, W)`` integer
  class maps (``mask``; 255 = ignore); ``(N, L)`` integer sequences padded with negative values (``text``).
* ``yolo``: a folder with one ``.txt`` per image, a line ``class cx cy w h`` per object, normalised to ``[0, 1]``
  of the image (a polygon line ``class x1 y1 x2 y2 ...`` counts as its bounding box); an image without a file has no
  objects.
* ``coco``: a COCO instances JSON; ``bbox`` ``[x, y, w, h]`` in pixels of the image (``width``/``height`` of its
  ``images`` entry); ``category_id`` mapped to contiguous ids in sorted category order; crowd annotations skipped.
* ``mask``: a folder with one PNG per image, pixel value = class id (palette images: the palette index), 255 = ignore.

Pairing of label files with samples: for an image folder, by file stem (``images/a.jpg`` <-> ``labels/a.txt``,
``labels/a.png``, or the COCO image whose ``file_name`` has stem ``a``); for an ``.npz``, sample ``i`` of the data as
opened (after ``--split``) <-> the file (or COCO ``file_name``) whose stem is the integer ``i`` (``7.txt``,
``000007.txt``). Image folders are resized and centre-cropped (:func:`resized_crop`); boxes and masks
go through the same geometry (boxes clipped to the crop, masks resized with nearest neighbour).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.errors import CalibrationError, UserInputError

logger = logging.getLogger(__name__)

LABEL_FORMATS = ("yolo", "coco", "mask", "text")
IGNORE = 255
Reader = Callable[[np.ndarray], list[np.ndarray]]
Geometry = tuple[int, tuple[int, int]]  # image folders: (size, (crop height, crop width))


@dataclass(frozen=True, eq=False)
class TargetSource:
    """Dense labels of a dataset, read by sample index (lazily where files are read).

    Attributes:
        kind: ``map`` (per sample an int64 ``(H, W)``, -1 = ignore), ``boxes`` (float64 ``(m, 5)``: class, cx, cy,
            w, h normalised) or ``sequence`` (int64 ``(L,)`` class ids).
        format: where they come from (``npz``, ``yolo``, ``coco``, ``mask``, ``text``).
        num_samples: samples covered.
        reader: sample indices -> per-sample arrays.
        stated_classes: the class count the source states (COCO categories), else None (scanned).
        path: the label file or folder (None for an ``.npz`` array).
    """

    kind: str
    format: str
    num_samples: int
    reader: Reader = field(repr=False)
    stated_classes: int | None = None
    path: str | None = None

    def take(self, start: int, stop: int) -> list[np.ndarray]:
        """Per-sample targets of samples ``[start, stop)``."""
        return self.reader(np.arange(start, stop))

    def subset(self, start: int, stop: int) -> TargetSource:
        """Samples ``[start, stop)`` as a source of their own."""
        base = self.reader

        def reader(idx: np.ndarray) -> list[np.ndarray]:
            return base(np.asarray(idx) + start)

        return replace(self, num_samples=stop - start, reader=reader)

    @cached_property
    def num_classes(self) -> int:
        """Class ids span ``0 .. num_classes - 1`` (stated, else the largest id over every sample + 1)."""
        if self.stated_classes is not None:
            return self.stated_classes
        top = -1
        for start in range(0, self.num_samples, 256):
            for item in self.take(start, min(start + 256, self.num_samples)):
                values = item[:, 0] if self.kind == "boxes" else item
                if values.size:
                    top = max(top, int(values.max()))
        return top + 1


def resized_crop(width: int, height: int, size: int, crop_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where an image folder's image of ``width x height`` goes: the size after resizing its shorter side to ``size``
    and the top-left corner of the centre crop, ``(resized width, resized height, left, top)``."""
    ratio = size / min(width, height)
    rw, rh = max(1, round(width * ratio)), max(1, round(height * ratio))
    return rw, rh, (rw - crop_hw[1]) // 2, (rh - crop_hw[0]) // 2


def resized_box(geometry: Geometry | None, width: int, height: int) -> Callable[[np.ndarray], np.ndarray]:
    """Boxes ``(m, 5)`` normalised to an original image of ``width x height`` -> normalised to what the image folder
    loader makes of it (resize the shorter side to ``size``, centre crop), clipped; boxes left empty are dropped."""
    if geometry is None:
        return lambda boxes: boxes
    size, (ch, cw) = geometry
    rw, rh, left, top = resized_crop(width, height, size, (ch, cw))

    def apply(boxes: np.ndarray) -> np.ndarray:
        x1 = ((boxes[:, 1] - boxes[:, 3] / 2) * rw - left) / cw
        x2 = ((boxes[:, 1] + boxes[:, 3] / 2) * rw - left) / cw
        y1 = ((boxes[:, 2] - boxes[:, 4] / 2) * rh - top) / ch
        y2 = ((boxes[:, 2] + boxes[:, 4] / 2) * rh - top) / ch
        x1, x2, y1, y2 = (np.clip(v, 0.0, 1.0) for v in (x1, x2, y1, y2))
        out = np.stack([boxes[:, 0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)
        return out[(out[:, 3] > 0) & (out[:, 4] > 0)]

    return apply


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:
        raise UserInputError(f"cannot read image {path}: {err}") from err


def _label_files(folder: Path, suffixes: Sequence[str], names: Sequence[str], numeric: bool) -> list[Path | None]:
    """Per sample name its label file in ``folder`` (module docstring's pairing), or None."""
    if not folder.is_dir():
        raise UserInputError(f"label folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes:
            continue
        key = path.stem
        if numeric:
            if not key.isdigit():
                continue
            key = str(int(key))
        if key in found:
            raise UserInputError(f"two label files pair with the same sample: {found[key].name} and {path.name}")
        found[key] = path
    files = [found.get(name) for name in names]
    if found and not any(files):
        rule = "the sample index (0.txt, 1.txt, ...)" if numeric else "the image file's stem"
        raise UserInputError(f"no label file in {folder} pairs with a sample; name them after {rule}")
    return files


def _yolo_file(path: Path | None) -> np.ndarray:
    """One YOLO label file -> ``(m, 5)`` rows ``class, cx, cy, w, h``."""
    if path is None:
        return np.zeros((0, 5))
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise UserInputError(f"{path}:{number}: expected 'class cx cy w h' numbers, got {line!r}") from None
        if len(values) == 5:
            row = values
        elif len(values) >= 7 and len(values) % 2 == 1:  # a polygon: its bounding box
            xs, ys = values[1::2], values[2::2]
            row = [values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        else:
            raise UserInputError(f"{path}:{number}: expected 'class cx cy w h' (5 numbers), got {len(values)}")
        if row[0] < 0 or row[0] != int(row[0]) or min(row[1:]) < -1e-6 or max(row[1:]) > 1 + 1e-6:
            raise UserInputError(f"{path}:{number}: class must be an integer >= 0 and coordinates normalised to "
                                 f"[0, 1], got {line!r}")
        rows.append(row)
    return np.asarray(rows, np.float64).reshape(-1, 5)


def yolo_source(folder: str | os.PathLike[str], names: Sequence[str], *, numeric: bool,
                images: Sequence[Path] | None = None, geometry: Geometry | None = None) -> TargetSource:
    """Boxes of a YOLO label folder (module docstring), read once; ``images`` and ``geometry`` for image folders."""
    folder = Path(folder)
    files = _label_files(folder, (".txt",), names, numeric)
    boxes = []
    for i, path in enumerate(files):
        rows = _yolo_file(path)
        if geometry is not None and images is not None and len(rows):
            rows = resized_box(geometry, *_image_size(images[i]))(rows)
        boxes.append(rows)
    logger.info("read %d YOLO label files (%d objects) from %s", sum(f is not None for f in files),
                sum(len(b) for b in boxes), folder)
    items = tuple(boxes)
    return TargetSource("boxes", "yolo", len(items), lambda idx: [items[i] for i in idx], path=str(folder))


def coco_source(path: str | os.PathLike[str], names: Sequence[str], *, numeric: bool,
                geometry: Geometry | None = None) -> TargetSource:
    """Boxes of a COCO instances JSON (module docstring), read once."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"COCO annotation file not found: {path}")
    try:
        doc = json.loads(path.read_text())
        categories = sorted(int(c["id"]) for c in doc["categories"])
        images = {}
        for entry in doc["images"]:
            stem = Path(str(entry["file_name"])).stem
            key = str(int(stem)) if numeric and stem.isdigit() else stem
            images[key] = (int(entry["id"]), float(entry["width"]), float(entry["height"]))
        by_image: dict[int, list[list[float]]] = {}
        contiguous = {c: i for i, c in enumerate(categories)}
        for ann in doc.get("annotations", ()):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            by_image.setdefault(int(ann["image_id"]), []).append([contiguous[int(ann["category_id"])], x, y, w, h])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path} is not a COCO instances file (images, annotations, categories): "
                             f"{err!r}") from err
    missing = [n for n in names if n not in images]
    if missing:
        rule = "the sample index" if numeric else "the image file's stem"
        raise UserInputError(f"{len(missing)} samples have no image entry in {path} (e.g. '{missing[0]}'; an entry "
                             f"pairs by the stem of its file_name = {rule})")
    boxes = []
    for name in names:
        image_id, width, height = images[name]
        rows = np.asarray(by_image.get(image_id, []), np.float64).reshape(-1, 5)
        norm = np.stack([rows[:, 0], (rows[:, 1] + rows[:, 3] / 2) / width, (rows[:, 2] + rows[:, 4] / 2) / height,
                         rows[:, 3] / width, rows[:, 4] / height], axis=1)
        boxes.append(resized_box(geometry, int(width), int(height))(norm) if len(norm) else norm)
    items = tuple(boxes)
    return TargetSource("boxes", "coco", len(items), lambda idx: [items[i] for i in idx],
                        stated_classes=len(categories), path=str(path))


def _read_mask(path: Path | None, geometry: Geometry | None) -> np.ndarray:
    from PIL import Image

    if path is None:
        raise CalibrationError("a sample has no mask file (a mask PNG per image, named after it)")
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise UserInputError(f"mask {path} has mode {img.mode}; a mask is a one-channel image whose pixel "
                                     f"values are class ids (255 = ignore)")
            if geometry is not None:
                size, (ch, cw) = geometry
                rw, rh, left, top = resized_crop(*img.size, size, (ch, cw))
                img = img.resize((rw, rh), Image.NEAREST).crop((left, top, left + cw, top + ch))
            values = np.asarray(img).astype(np.int64)
    except OSError as err:
        raise UserInputError(f"cannot read mask {path}: {err}") from err
    values[values == IGNORE] = -1
    return values


def mask_source(folder: str | os.PathLike[str], names: Sequence[str], *, numeric: bool,
                geometry: Geometry | None = None) -> TargetSource:
    """Class maps of a folder of mask PNGs (module docstring), read lazily, sample by sample."""
    folder = Path(folder)
    files = tuple(_label_files(folder, (".png",), names, numeric))
    absent = [names[i] for i, f in enumerate(files) if f is None]
    if absent:
        raise UserInputError(f"{len(absent)} samples have no mask in {folder} (e.g. '{absent[0]}'); give a PNG per "
                             f"image, named after it")
    return TargetSource("map", "mask", len(files), lambda idx: [_read_mask(files[i], geometry) for i in idx],
                        path=str(folder))


def array_source(array: np.ndarray, label_format: str | None, where: str) -> TargetSource:
    """Dense labels stored in an ``.npz`` (``y`` of shape ``(N, H, W)``: class maps; ``(N, L)``: sequences)."""
    y = np.asarray(array) if not isinstance(array, np.memmap) else array
    if not np.issubdtype(y.dtype, np.integer):
        raise CalibrationError(f"labels of {where} must be integer class ids, got dtype {y.dtype}")
    if y.ndim == 3 and label_format in (None, "mask"):
        def maps(idx: np.ndarray) -> list[np.ndarray]:
            out = []
            for i in idx:
                values = np.asarray(y[i]).astype(np.int64)
                values[values == IGNORE] = -1
                out.append(values)
            return out

        if y.size and int(np.min(y)) < 0:
            raise CalibrationError(f"class maps of {where} must be ids >= 0 (255 = ignore), got {int(np.min(y))}")
        return TargetSource("map", "npz", len(y), maps)
    if y.ndim == 2 and label_format in (None, "text"):
        return TargetSource("sequence", "text", len(y),
                            lambda idx: [np.asarray(y[i]).astype(np.int64)[np.asarray(y[i]) >= 0] for i in idx])
    raise UserInputError(f"labels of {where} have shape {list(y.shape)}: per-image classes are (N,), class maps "
                         f"(N, H, W) (--label-format mask), sequences (N, L) padded with -1 (--label-format text)"
                         + (f"; --label-format {label_format} does not fit" if label_format else ""))


def guess_format(path: str | os.PathLike[str]) -> str:
    """The label format of ``--labels-path`` when ``--label-format`` is not given: a ``.json`` file is COCO, a folder
    of ``.txt`` files YOLO, a folder of ``.png`` files masks."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir()}
        if ".txt" in suffixes and ".png" not in suffixes:
            return "yolo"
        if ".png" in suffixes and ".txt" not in suffixes:
            return "mask"
    if not path.exists():
        raise UserInputError(f"labels path not found: {path}")
    raise UserInputError(f"cannot tell the label format of {path}; give --label-format (yolo: a folder of .txt, coco: "
                         f"a .json file, mask: a folder of .png)")


def labels_path_source(label_format: str | None, labels_path: str | os.PathLike[str], names: Sequence[str], *,
                       numeric: bool, images: Sequence[Path] | None = None,
                       geometry: Geometry | None = None) -> TargetSource:
    """The target source of ``--labels-path`` (``--label-format`` or guessed), paired with the samples ``names``."""
    fmt = label_format or guess_format(labels_path)
    if fmt == "yolo":
        return yolo_source(labels_path, names, numeric=numeric, images=images, geometry=geometry)
    if fmt == "coco":
        return coco_source(labels_path, names, numeric=numeric, geometry=geometry)
    if fmt == "mask":
        return mask_source(labels_path, names, numeric=numeric, geometry=geometry)
    if fmt == "text":
        raise UserInputError("text labels come from the .npz itself: an integer array y of shape (N, L), class ids of "
                             "the model's dictionary padded with -1 (no --labels-path)")
    raise UserInputError(f"unknown label format {fmt!r}; choose one of {', '.join(LABEL_FORMATS)}")
