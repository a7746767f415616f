"""Raw arrays into model inputs: image layouts turned into NCHW (``LAYOUTS``), ``uint8`` and float arrays normalised
by ``(x * scale - mean) / std`` (per channel where ``mean`` / ``std`` are), the normalisation checked, and the
text a dataset name shows of it.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserInputError

# CHW = NCHW, HWC = NHWC, HW = NHW (a channel axis is added); "none" leaves arrays alone; "auto": N x H x W gets a
# channel axis, N x H x W x C with C in (1, 3) and axis 1 not in (1, 3) is channels-last.
LAYOUTS = ("auto", "NCHW", "NHWC", "NHW", "CHW", "HWC", "HW", "none")


def _to_nchw(batch: np.ndarray, layout: str) -> np.ndarray:
    """Return an image batch (leading sample axis) in NCHW layout according to ``layout``."""
    if layout in ("NHW", "HW") or (layout == "auto" and batch.ndim == 3):
        return batch[:, None]
    channels_last = layout in ("NHWC", "HWC") or (
        layout == "auto" and batch.ndim == 4 and batch.shape[-1] in (1, 3) and batch.shape[1] not in (1, 3)
    )
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2)) if channels_last else batch


def _convert(batch: np.ndarray, scale: float | None, mean: object, std: object, layout: str) -> np.ndarray:
    """Apply the stated conversion spec to one batch of one array (see the module docstring)."""
    if layout != "none" and batch.ndim in (3, 4):
        batch = _to_nchw(batch, layout)
    if batch.dtype == np.uint8 or np.issubdtype(batch.dtype, np.floating):
        factor = (1.0 / 255.0 if batch.dtype == np.uint8 else 1.0) if scale is None else scale
        shape = (1, -1) + (1,) * (batch.ndim - 2) if batch.ndim >= 2 else (-1,)
        mean_arr = np.asarray(0.0 if mean is None else mean, dtype=np.float32)
        std_arr = np.asarray(1.0 if std is None else std, dtype=np.float32)
        mean_arr = mean_arr.reshape(shape) if mean_arr.ndim else mean_arr
        std_arr = std_arr.reshape(shape) if std_arr.ndim else std_arr
        batch = (batch.astype(np.float32) * np.float32(factor) - mean_arr) / std_arr
    return batch


def _text(value: object, default: float) -> str:
    return str(default if value is None else np.asarray(value).tolist())


def _check_normalisation(scale: float | None, mean: object, std: object) -> None:
    """``scale``, ``mean`` and ``std`` must be finite and ``std`` non-zero (a zero std is a setting, not the data)."""
    if scale is not None and not (np.isfinite(scale) and scale != 0):
        raise UserInputError(f"--scale must be a finite non-zero number, got {scale}")
    for name, value in (("mean", mean), ("std", std)):
        if value is not None and not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            raise UserInputError(f"--{name} must be finite numbers, got {np.asarray(value).tolist()}")
    if std is not None and np.any(np.asarray(std, dtype=np.float64) == 0):
        raise UserInputError(f"--std must be non-zero (it divides the inputs), got {np.asarray(std).tolist()}")
