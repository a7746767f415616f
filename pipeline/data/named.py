"""A dataset named on the command line or in a job file (``mnist``, an ``.npz`` file, an image folder), opened with
its defaults (:func:`open_dataset`), and the held-out split an evaluation uses by default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.datasets import Dataset, from_image_folder, from_npz, input_map_from_keys, mnist_path
from pipeline.data.images import IMAGE_ORDERS
from pipeline.data.npz import npz_keys
from pipeline.errors import UserInputError


def default_eval_split(spec: str | os.PathLike[str]) -> str:
    """The held-out part of a data spec: ``test`` for mnist, an image folder and an .npz with ``*_test`` arrays,
    else ``all``."""
    path = Path(spec)
    if str(spec) == "mnist" or path.is_dir():
        return "test"
    if path.suffix == ".npz" and path.is_file():
        return "test" if any(k.endswith("_test") for k in npz_keys(path)) else "all"
    return "all"


def open_dataset(
    spec: str | os.PathLike[str],
    *,
    split: str | None = None,
    limit: int | None = None,
    scale: float | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    size: int | None = None,
    crop: int | None = None,
    input_keys: Sequence[str] | None = None,
    label_key: str | None = None,
    label_format: str | None = None,
    labels_path: str | os.PathLike[str] | None = None,
    channel_order: str | None = None,
) -> Dataset:
    """Open a dataset from a CLI-style spec: ``"mnist"``, an ``.npz`` file or an image folder.

    * ``"mnist"``: the shipped digits with the demo model's normalisation (mean 0.1307, std 0.3081 unless given);
      ``split`` defaults to ``"train"``.
    * ``.npz``: :func:`from_npz`; ``split`` defaults to ``"train"`` when the file has ``*_train`` arrays, else all.
      ``input_keys`` (``ARRAY`` or ``ARRAY=INPUT``, see :func:`input_map_from_keys`) picks the input arrays and
      ``label_key`` the labels (default ``y``; arrays named otherwise are inputs).
    * a folder: :func:`from_image_folder` (of ``root/<split>`` when that exists); defaults size 256, crop 224 and
      the ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), RGB; ``channel_order`` ``rgb``, ``bgr``
      or ``gray`` (one channel; default mean/std 0.449 / 0.226, the means of ImageNet's).

    ``split="all"`` means every sample. ``label_format`` / ``labels_path``: dense labels (:mod:`pipeline.data.labels`).
    Raises UserInputError for a spec that is none of these.
    """
    chosen = None if split == "all" else split
    order = IMAGE_ORDERS.get((channel_order or "rgb").lower())
    if order is None:
        raise UserInputError(f"channel order {channel_order!r}: choose one of {', '.join(IMAGE_ORDERS)}")
    if order != "RGB" and (str(spec) == "mnist" or not Path(spec).is_dir()):
        raise UserInputError("--channel-order applies to image folders; an .npz holds its arrays as they are")
    if (input_keys or label_key) and not (str(spec) == "mnist" or Path(spec).suffix == ".npz"):
        raise UserInputError("--input-key/--label-key name arrays of an .npz file; image folders take their labels "
                             "from the class sub-folders")
    npz_options = {"input_map": input_map_from_keys(input_keys), "labels_key": label_key or "y",
                   "label_format": label_format, "labels_path": labels_path}
    if str(spec) == "mnist":
        mean, std = (0.1307 if mean is None else mean), (0.3081 if std is None else std)
        chosen = "train" if split is None else chosen
        return from_npz(mnist_path(), scale=scale, mean=mean, std=std, split=chosen, limit=limit, **npz_options)
    path = Path(spec)
    if path.is_file() and path.suffix == ".npz":
        if split is None:
            chosen = "train" if any(k.endswith("_train") for k in npz_keys(path)) else None
        return from_npz(path, scale=scale, mean=mean, std=std, split=chosen, limit=limit, **npz_options)
    if path.is_dir():
        if scale is not None:
            raise UserInputError(
                "--scale applies to .npz data; image folders are always read on the [0, 1] scale"
            )
        root = path / chosen if chosen and (path / chosen).is_dir() else path
        gray = order == "L"
        mean = ((0.449,) if gray else (0.485, 0.456, 0.406)) if mean is None else mean
        std = ((0.226,) if gray else (0.229, 0.224, 0.225)) if std is None else std
        return from_image_folder(root, size=size or 256, crop=crop or 224, mean=mean, std=std, limit=limit,
                                 channel_order=order, label_format=label_format, labels_path=labels_path)
    raise UserInputError(f"data '{spec}' not found: give 'mnist', an existing .npz file or an image folder")
