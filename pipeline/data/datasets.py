"""Calibration and evaluation data: one :class:`Dataset` interface over npz files, image folders and Python iterables.

A dataset yields ``(feeds, labels)`` batches in a fixed order (no shuffling): ``feeds`` maps model input names to
arrays with a leading batch axis, ``labels`` is an int64 vector or None. Loaders:

* :func:`from_npz`: arrays of an ``.npz`` file mapped to model inputs. ``uint8`` arrays become float32 by
  ``x_float = (x * scale - mean) / std`` (defaults: scale 1/255, mean 0, std 1; ``mean``/``std`` may be per-channel);
  float arrays get the same formula with default scale 1. Image layouts are turned into NCHW (see ``LAYOUTS``).
  ``split="train"|"test"`` takes ``<key>_train``/``<key>_test`` arrays when the file has them, otherwise the MNIST
  convention of the shipped data: samples 0..7999 are training, 8000.. held-out test.
* :func:`from_image_folder`: one sub-folder per class (sorted names give label ids 0..K-1), or plain images in the
  folder itself (unlabelled: for label-free scoring and recovery); each image is resized
  so that its shorter side is ``size`` (bilinear), centre-cropped to ``crop``, scaled to [0, 1], normalised by
  ``(x - mean) / std`` per channel and laid out CHW. Images are read lazily, batch by batch.
* :func:`from_iterable`: ``(inputs, labels)`` batches from Python; materialised once, so a generator is fine.

A dataset built from a single unnamed array is bound to the model's single input by :meth:`Dataset.bind` (called by
:func:`check_against_model`). All conversions are deterministic.

Datasets read from files carry a :class:`DataSpec`: the source (kind, path, options) and the steps applied since
(task restriction, input binding, sample ranges), a few hundred bytes that a Ray worker reopens by itself
(:meth:`DataSpec.open`) to read only its own slice (arrays of an uncompressed ``.npz`` are memory-mapped, images are
read lazily), instead of arrays pickled and shipped from the driver. In-memory datasets (:func:`from_iterable`) have
none.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.convert import LAYOUTS, _check_normalisation, _convert, _text
from pipeline.data.images import IMAGE_SUFFIXES, _load_image
from pipeline.data.npz import _read_npz, _select_split
from pipeline.errors import CalibrationError, UserInputError

LOG = logging.getLogger(__name__)


ModelInputs = Mapping[str, tuple[Sequence[int | None], np.dtype | type]]
Loader = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class DataSpec:
    """How to reopen a dataset from its files: the source and the steps applied to it since (see the module
    docstring).

    Attributes:
        kind: ``"npz"`` (:func:`from_npz`) or ``"images"`` (:func:`from_image_folder`).
        path: absolute path of the file or folder (it must be readable at the same path wherever the spec is opened).
        options: keyword arguments of the loader.
        steps: ``("task", task dict)``, ``("bind", input name)`` or ``("range", start, stop)``, in order.
    """

    kind: str
    path: str
    options: tuple[tuple[str, Any], ...] = ()
    steps: tuple[tuple[Any, ...], ...] = ()

    def then(self, *step: Any) -> DataSpec:
        """This spec with one more step."""
        return replace(self, steps=(*self.steps, tuple(step)))

    def open(self) -> Dataset:
        """The dataset this spec describes, read from its files."""
        options = dict(self.options)
        data = from_npz(self.path, **options) if self.kind == "npz" else from_image_folder(self.path, **options)
        for step in self.steps:
            if step[0] == "task":
                from pipeline.data.task import Task

                task = Task.from_dict(step[1])
                assert task is not None
                data = task.dataset(data).data
            elif step[0] == "bind":
                data = data.bind([step[1]])
            else:
                data = data.subset(step[1], step[2])
        return data


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled (or unlabelled) samples that can be iterated in batches, deterministically (compared by identity).

    Attributes:
        name: Human-readable description (source, split, preprocessing), recorded in calibration statistics.
        input_name: Model input fed by a single-array dataset once bound; None when unbound or multi-input.
        num_samples: Number of samples.
        labels: Read-only int64 labels of shape (num_samples,), or None.
        keys: Feed keys produced by ``loader`` (array names in the source).
        loader: Function from sample indices to ``{key: batch array}``.
        spec: How to reopen this dataset from its files (None for in-memory data); see :class:`DataSpec`.
        targets: Dense labels (class maps, boxes, sequences; :class:`pipeline.data.labels.TargetSource`), or None.
    """

    name: str
    input_name: str | None
    num_samples: int
    labels: np.ndarray | None
    keys: tuple[str, ...]
    loader: Loader = field(repr=False, compare=False)
    spec: DataSpec | None = field(default=None, repr=False, compare=False)
    targets: Any = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int | None:
        """Number of classes (largest label + 1), or None without labels."""
        if self.labels is None or self.labels.size == 0:
            return None
        return int(self.labels.max()) + 1

    @property
    def feed_names(self) -> tuple[str, ...]:
        """Names of the feeds yielded by :meth:`batches`."""
        return (self.input_name,) if self.input_name is not None and len(self.keys) == 1 else self.keys

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Yield ``(feeds, labels)`` for consecutive samples, ``batch_size`` at a time (the last batch may be short)."""
        if batch_size < 1:
            raise UserInputError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, self.num_samples, batch_size):
            yield self.take(start, min(start + batch_size, self.num_samples))

    def take(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """``(feeds, labels)`` of samples ``[start, stop)``."""
        idx = np.arange(start, stop)
        feeds = self.loader(idx)
        if self.input_name is not None and len(self.keys) == 1:
            feeds = {self.input_name: feeds[self.keys[0]]}
        return feeds, (None if self.labels is None else self.labels[idx])

    def subset(self, start: int, stop: int) -> Dataset:
        """Samples ``[start, stop)`` as a dataset of their own (its spec, if any, records the range)."""
        if not 0 <= start <= stop <= self.num_samples:
            raise UserInputError(f"sample range [{start}, {stop}) is outside dataset '{self.name}' of "
                                 f"{self.num_samples} samples")
        base = self.loader

        def loader(idx: np.ndarray) -> dict[str, np.ndarray]:
            return base(np.asarray(idx) + start)

        labels = None if self.labels is None else self.labels[start:stop]
        spec = None if self.spec is None else self.spec.then("range", start, stop)
        targets = None if self.targets is None else self.targets.subset(start, stop)
        return replace(self, name=f"{self.name}[{start}:{stop}]", num_samples=stop - start, labels=labels,
                       loader=loader, spec=spec, targets=targets)

    def bind(self, model_input_names: Sequence[str]) -> Dataset:
        """Return this dataset with its feeds named after ``model_input_names``.

        Raises:
            CalibrationError: The feeds cannot be matched to the model inputs.
        """
        names = tuple(model_input_names)
        if set(self.feed_names) == set(names):
            return self
        if len(self.keys) == 1 and len(names) == 1:
            return replace(self, input_name=names[0], spec=None if self.spec is None else self.spec.then("bind", names[0]))
        raise CalibrationError(
            f"dataset '{self.name}' provides arrays {list(self.feed_names)} but the model has inputs {list(names)}; "
            "name the input array with --input-key ARRAY (or ARRAY=INPUT per input; Python: input_map=...) "
            "and the labels with --label-key"
        )


def mnist_path() -> Path:
    """Return the path of the shipped ``mnist10k.npz`` (0..7999 training, 8000..9999 held-out test)."""
    return Path(str(importlib.resources.files("pipeline") / "assets" / "mnist10k.npz"))


def _checked_labels(labels: np.ndarray | None, source: str) -> np.ndarray | None:
    """Return labels as a read-only int64 vector, or raise CalibrationError if they are not non-negative integers."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise CalibrationError(f"labels of {source} must be a vector of class ids, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise CalibrationError(
            f"labels of {source} must be integer class ids, got dtype {labels.dtype}; convert them with astype(int)"
        )
    if labels.size and labels.min() < 0:
        raise CalibrationError(f"labels of {source} must be non-negative class ids, got {int(labels.min())}")
    out = labels.astype(np.int64)
    out.setflags(write=False)
    return out


def require_labels(dataset: Dataset) -> np.ndarray:
    """Return the dataset's labels, or raise CalibrationError if it has none or only one class."""
    if dataset.labels is None:
        raise CalibrationError(
            f"dataset '{dataset.name}' has no labels, but task-aware scoring (DI, LDA, PLS) needs class labels; "
            "provide labels or use a label-free method such as magnitude"
        )
    if np.unique(dataset.labels).size < 2:
        raise CalibrationError(
            f"dataset '{dataset.name}' has one class; discriminant scoring needs two or more"
        )
    return dataset.labels


def _options(**options: Any) -> tuple[tuple[str, Any], ...]:
    """Loader options as a spec records them (sequences as tuples, mappings as sorted pairs turned back on open)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return dict(sorted(value.items()))
        if isinstance(value, (list, tuple, np.ndarray)):
            return tuple(np.asarray(value).tolist())
        return value

    return tuple((key, plain(value)) for key, value in options.items())


def from_npz(
    path: str | os.PathLike[str],
    *,
    input_map: Mapping[str, str] | None = None,
    labels_key: str | None = "y",
    scale: float | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    layout: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    label_format: str | None = None,
    labels_path: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load a dataset from an ``.npz`` file (see the module docstring for the conversion spec).

    Args:
        path: The ``.npz`` file.
        input_map: ``{array key: model input name}``; default: every non-label array under its own key (a single
            array is bound later to the model's single input).
        labels_key: Key of the label vector (None: unlabelled; a missing ``"y"`` also means unlabelled).
        scale: ``x_float = (x * scale - mean) / std``; defaults to 1/255 for uint8, 1 for float.
        mean: see ``scale``.
        std: see ``scale``.
        layout: One of ``LAYOUTS``.
        split: ``"train"``, ``"test"`` or None (all samples).
        limit: Keep only the first ``limit`` samples (after the split). Arrays are converted lazily, per batch.
        label_format: dense labels (:mod:`pipeline.data.labels`): a labels array of shape ``(N, H, W)`` (class maps)
            or ``(N, L)`` (sequences) becomes the dataset's ``targets``.
        labels_path: read the dense labels from label files instead (sample ``i`` <-> the file whose stem is the
            integer ``i``).

    Raises:
        UserInputError: Missing or unreadable file, unknown key, layout or split.
        CalibrationError: Arrays with different sample counts, or bad labels.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise UserInputError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    _check_normalisation(scale, mean, std)
    arrays = _select_split(_read_npz(path), labels_key or "", split, path)
    if labels_key is not None and labels_key != "y" and labels_key not in arrays:
        raise UserInputError(f"{path} has no labels array {labels_key!r}; it has {sorted(arrays)} (--label-key)")
    labels = arrays.pop(labels_key, None) if labels_key else None
    mapping = dict(input_map) if input_map is not None else {k: k for k in arrays}
    missing = sorted(set(mapping) - set(arrays))
    if missing or not mapping:
        raise UserInputError(f"{path}: input arrays {missing or '(none)'} not found; it has {sorted(arrays)} "
                             "(--input-key)")
    sources = {name: arrays[key] for key, name in mapping.items()}
    counts = {name: len(arr) for name, arr in sources.items()}
    counts |= {} if labels is None else {"labels": len(labels)}
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"{path}: arrays have different numbers of samples: {counts}")
    num = min(next(iter(counts.values())), limit if limit is not None else 1 << 62)
    labels = None if labels is None else labels[:num]
    targets = None
    if labels_path is not None or (labels is not None and np.ndim(labels) > 1):
        from pipeline.data.labels import array_source, labels_path_source

        if labels_path is not None:
            if labels is not None:
                LOG.warning("%s: labels from %s, not the array %r", path, labels_path, labels_key)
            targets = labels_path_source(label_format, labels_path, [str(i) for i in range(num)], numeric=True)
        else:
            targets = array_source(labels, label_format, str(path))
        labels = None

    def loader(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {name: _convert(arr[idx], scale, mean, std, layout) for name, arr in sources.items()}

    keys = tuple(sources)
    name = f"npz:{path.name}" + (f"[{split}]" if split else "") + (f"[:{num}]" if limit is not None else "")
    name += f" scale={'default' if scale is None else scale} mean={_text(mean, 0)} std={_text(std, 1)} layout={layout}"
    dense = {} if targets is None else {"label_format": label_format, "labels_path": None if labels_path is None
                                        else str(Path(labels_path).resolve())}
    spec = DataSpec("npz", str(path.resolve()), _options(input_map=input_map, labels_key=labels_key, scale=scale,
                                                         mean=mean, std=std, layout=layout, split=split, limit=limit,
                                                         **dense))
    return Dataset(name, keys[0] if input_map is not None and len(keys) == 1 else None, num,
                   _checked_labels(labels, str(path)), keys, loader, spec, targets)  # fmt: skip


def from_image_folder(
    root: str | os.PathLike[str],
    *,
    size: int,
    crop: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str = "RGB",
    limit: int | None = None,
    label_format: str | None = None,
    labels_path: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load an image dataset laid out as ``root/<class name>/<image>`` (class ids from sorted names), or an
    unlabelled one laid out as ``root/<image>`` (no class sub-folders).

    Args:
        root: Folder with one sub-folder per class, or with the images themselves (unlabelled).
        size: Shorter side after resizing (bilinear).
        crop: Centre crop, ``int`` for square or ``(height, width)``.
        mean: Per-channel mean on the [0, 1] scale, in ``channel_order``.
        std: Per-channel standard deviation on the [0, 1] scale, in ``channel_order``.
        channel_order: ``"RGB"``, ``"BGR"`` or ``"L"`` (grayscale, one channel).
        limit: Keep only the first ``limit`` images (sorted by class, then file name). Images are read lazily.
        label_format: the format of the dense labels of an unlabelled folder (:mod:`pipeline.data.labels`).
        labels_path: where those labels are (image ``a.jpg`` <-> label ``a.txt`` / ``a.png`` / the COCO image with
            that stem), read through the same resize and crop as the images.

    Raises:
        UserInputError: Missing root, no class folders or no images, Pillow not installed, bad channel order.
    """
    root = Path(root)
    _check_normalisation(None, mean, std)
    if channel_order not in ("RGB", "BGR", "L"):
        raise UserInputError(f"channel_order must be 'RGB', 'BGR' or 'L', got {channel_order!r}")
    if not root.is_dir():
        raise UserInputError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, cls in enumerate(classes) for f in sorted((root / cls).iterdir())]
    files = [(f, label) for f, label in files if f.suffix.lower() in IMAGE_SUFFIXES]
    odd = next((f for f, _ in files if not f.is_file()), None)
    if odd is not None:  # a FIFO would block the read forever, a device read garbage
        raise UserInputError(f"{odd} is not a regular file (a folder, device, FIFO or socket); image folders hold "
                             "image files")
    if not files:  # plain images, no classes: unlabelled (label-free methods and recovery accept it)
        files = [(f, -1) for f in sorted(root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        classes = []
    if not files:
        raise UserInputError(f"{root} has no images (expected root/<image> or root/<class>/<image>; suffixes "
                             f"{', '.join(IMAGE_SUFFIXES)})")
    files = files[:limit] if limit is not None else files
    crop_hw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    channels = 1 if channel_order == "L" else 3
    for what, value in (("mean", mean), ("std", std)):
        if np.asarray(value).size not in (1, channels):
            raise UserInputError(f"--{what} has {np.asarray(value).size} values; {channel_order} images have "
                                 f"{channels} channel(s): give 1 or {channels}")
    mean_arr = np.asarray(mean, np.float32).reshape(-1, 1, 1) * np.ones((channels, 1, 1), np.float32)
    std_arr = np.asarray(std, np.float32).reshape(-1, 1, 1) * np.ones((channels, 1, 1), np.float32)

    def loader(idx: np.ndarray) -> dict[str, np.ndarray]:
        images = [_load_image(files[i][0], size, crop_hw, channel_order) for i in idx]
        return {"image": (np.stack(images) - mean_arr) / std_arr}

    labels = np.array([label for _, label in files], dtype=np.int64) if classes else None
    kind = f"{len(classes)} classes" if classes else "unlabelled"
    name = f"images:{root.name} ({kind}) size={size} crop={crop_hw} mean={list(mean)} std={list(std)}"
    name += f" {channel_order}"
    targets, dense = None, {}
    if labels_path is not None:
        from pipeline.data.labels import labels_path_source

        if classes:
            raise UserInputError(f"{root} has class sub-folders (per-image labels); --labels-path goes with a folder "
                                 f"of plain images")
        images = [f for f, _ in files]
        targets = labels_path_source(label_format, labels_path, [f.stem for f in images], numeric=False,
                                     images=images, geometry=(size, crop_hw))
        dense = {"label_format": label_format, "labels_path": str(Path(labels_path).resolve())}
    spec = DataSpec("images", str(root.resolve()), _options(size=size, crop=crop, mean=mean, std=std,
                                                            channel_order=channel_order, limit=limit, **dense))
    return Dataset(name, None, len(files), _checked_labels(labels, str(root)), ("image",), loader, spec, targets)


def from_iterable(
    batches: Iterable[tuple[np.ndarray | Mapping[str, np.ndarray], np.ndarray | None]],
    *,
    name: str = "python iterable",
) -> Dataset:
    """Build a dataset from ``(inputs, labels)`` batches (inputs: an array or ``{input name: array}``).

    Every item is a batch with a leading sample axis. Items are materialised (concatenated) once, so a one-shot
    generator is fine; labels must be given for all batches or for none.

    Raises:
        CalibrationError: Empty iterable, inconsistent keys, labels given for only some batches, bad labels.
    """
    parts: dict[str, list[np.ndarray]] = {}
    label_parts: list[np.ndarray | None] = []
    single = None
    for inputs, labels in batches:
        is_single = not isinstance(inputs, Mapping)
        feeds = {"input": np.asarray(inputs)} if is_single else {k: np.asarray(v) for k, v in inputs.items()}
        if single is None:
            single, parts = is_single, {k: [] for k in feeds}
        if is_single != single or set(feeds) != set(parts):
            raise CalibrationError(
                f"{name}: batches must share inputs; got {sorted(feeds)} after {sorted(parts)}"
            )
        for key, arr in feeds.items():
            parts[key].append(arr)
        label_parts.append(None if labels is None else np.atleast_1d(np.asarray(labels)))
    if single is None:
        raise CalibrationError(f"{name}: the iterable yielded no batches")
    if any(lab is None for lab in label_parts) and not all(lab is None for lab in label_parts):
        raise CalibrationError(f"{name}: labels were given for some batches but not all")
    arrays = {k: np.concatenate(v) for k, v in sorted(parts.items())}
    labels = None if label_parts[0] is None else np.concatenate(label_parts)
    counts = {k: len(a) for k, a in arrays.items()} | ({} if labels is None else {"labels": len(labels)})
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"{name}: inputs and labels have different numbers of samples: {counts}")
    for arr in arrays.values():
        arr.setflags(write=False)
    return Dataset(name, None, next(iter(counts.values())), _checked_labels(labels, name), tuple(arrays),
                   lambda idx: {k: a[idx] for k, a in arrays.items()})  # fmt: skip


def input_map_from_keys(keys: Sequence[str] | None) -> dict[str, str] | None:
    """``--input-key`` values (``ARRAY`` or ``ARRAY=INPUT``) as ``{array: model input}`` (None when not given).

    A bare ``ARRAY`` feeds the model's single input; ``ARRAY=INPUT`` names the input (one per input of a multi-input
    model).
    """
    if not keys:
        return None
    mapping: dict[str, str] = {}
    for key in keys:
        array, _, name = str(key).partition("=")
        if not array or (_ and not name):
            raise UserInputError(f"--input-key {key!r}: give ARRAY or ARRAY=INPUT (an array name of the .npz file)")
        mapping[array] = name or array
    return mapping


def validate_batch(feeds: Mapping[str, np.ndarray], model_inputs: ModelInputs, source: str = "data") -> None:
    """Check one batch against the model inputs: names, rank, static dims, dtype, finite values.

    Raises:
        CalibrationError: naming the input, what the model expects and what the data has.
    """
    if set(feeds) != set(model_inputs):
        raise CalibrationError(f"{source} feeds {sorted(feeds)}, the model has inputs {sorted(model_inputs)}")
    for name in sorted(model_inputs):
        shape, dtype = model_inputs[name]
        arr, where = feeds[name], f"{source}: input '{name}' expects"
        want = "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
        if arr.ndim != len(shape) or any(d not in (None, g) for d, g in zip(shape, arr.shape, strict=False)):
            raise CalibrationError(f"{where} shape {want}, got {list(arr.shape)}")
        if arr.dtype != np.dtype(dtype):
            raise CalibrationError(f"{where} dtype {np.dtype(dtype)}, got {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise CalibrationError(f"{source}: input '{name}' contains NaN or Inf values; clean the data")


def check_against_model(
    dataset: Dataset, model_inputs: ModelInputs, *, max_batches: int | None = None
) -> Dataset:
    """Check a dataset against the model inputs and return it bound to the model's input names.

    Args:
        dataset: The dataset.
        model_inputs: ``{input name: (shape with None for dynamic dims, numpy dtype)}``.
        max_batches: Check only this many batches of 256 samples (default: all).

    Raises:
        CalibrationError: Feeds do not match inputs, wrong shape/dtype, NaN/Inf, or no samples.
    """
    if dataset.num_samples == 0:
        raise CalibrationError(f"dataset '{dataset.name}' has no samples")
    bound = dataset.bind(list(model_inputs))
    for i, (feeds, _labels) in enumerate(bound.batches(256)):
        if max_batches is not None and i >= max_batches:
            break
        validate_batch(feeds, model_inputs, f"dataset '{dataset.name}' batch {i}")
    return bound
