"""Reading one image for :func:`pipeline.data.datasets.from_image_folder`: resized so its shorter side is ``size``
(bilinear), centre-cropped, scaled to [0, 1], laid out CHW; the file suffixes and channel orders a folder may hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserInputError

IMAGE_ORDERS = {"rgb": "RGB", "bgr": "BGR", "gray": "L"}
"""``--channel-order`` of image folders -> Pillow mode / channel order of :func:`from_image_folder`."""


IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def _load_image(path: Path, size: int, crop_hw: tuple[int, int], channel_order: str) -> np.ndarray:
    """Read one image: resize shorter side to ``size``, centre crop, CHW float32 in [0, 1]."""
    from PIL import Image

    from pipeline.data.labels import resized_crop

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channel_order == "L" else "RGB")
            w, h, left, top = resized_crop(*img.size, size, crop_hw)
            img = img.resize((w, h), Image.BILINEAR)
            ch, cw = crop_hw
            if ch > h or cw > w:
                raise UserInputError(f"crop {crop_hw} is larger than the resized image {h}x{w} of {path}")
            arr = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # Pillow's refusal of a decompression bomb
        raise UserInputError(f"cannot read image {path}: {err}") from err
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr[::-1].copy() if channel_order == "BGR" else arr
