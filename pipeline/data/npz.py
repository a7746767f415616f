"""Reading ``.npz`` files for :func:`pipeline.data.datasets.from_npz`: arrays memory-mapped when stored uncompressed
(CRC-checked as they are read), the train / test split (``<key>_train`` / ``<key>_test`` arrays, else the
MNIST convention of the shipped digits: samples 0..7999 train).
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CalibrationError, UserInputError

MNIST_TRAIN = 8000  # samples [0, 8000) of the shipped MNIST are the training split, the rest held-out test


def _select_split(arrays: dict[str, np.ndarray], labels_key: str, split: str | None, path: Path) -> dict:
    """Return the arrays of one split: explicit ``<key>_<split>`` arrays if present, else the MNIST index convention."""
    if split is None:
        return arrays
    if split not in ("train", "test"):
        raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
    suffixed = {k[: -len(split) - 1]: v for k, v in arrays.items() if k.endswith(f"_{split}")}
    if suffixed:
        return suffixed
    if any(k.endswith(("_train", "_test")) for k in arrays):
        raise CalibrationError(f"{path} has split arrays but none ending in '_{split}'; choose another --split "
                               f"(its arrays: {', '.join(sorted(arrays))})")
    n = len(arrays[labels_key]) if labels_key in arrays else len(next(iter(arrays.values())))
    if n <= MNIST_TRAIN:
        raise CalibrationError(
            f"{path} has {n} samples and no explicit split arrays; the built-in split convention "
            f"(0..{MNIST_TRAIN - 1} train, rest test) needs more than {MNIST_TRAIN}; use all of it with "
            f"--split all (Python: split=None), or store <name>_train / <name>_test arrays"
        )
    part = slice(0, MNIST_TRAIN) if split == "train" else slice(MNIST_TRAIN, None)
    return {k: v[part] for k, v in arrays.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``: read-only memory maps for uncompressed members (a reader touches only the samples
    it indexes), loaded arrays for compressed ones."""
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as handle:
            keys = sorted(handle.files)
            with zipfile.ZipFile(path) as archive:
                members = {info.filename: info for info in archive.infolist()}
            mapped = {k: _mapped(path, members.get(f"{k}.npy")) for k in keys}
            return {k: handle[k] if mapped[k] is None else mapped[k] for k in keys}
    except UserInputError:
        raise
    except Exception as err:  # zipfile, zlib, pickle and value errors all mean a corrupt or foreign file
        raise UserInputError(f"{path} is not a readable .npz file (corrupt, truncated or holding Python objects; "
                             f"write it with numpy.savez): {err}") from err


def npz_keys(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The array names of an ``.npz`` file (nothing else is read), with a clear error for a corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as handle:
            return tuple(sorted(handle.files))
    except Exception as err:  # zipfile and value errors mean a corrupt or foreign file
        raise UserInputError(f"{path} is not a readable .npz file (corrupt, truncated or not written by "
                             f"numpy.savez): {err}") from err


def _check_crc(handle: Any, path: Path, member: zipfile.ZipInfo) -> None:
    """The member's bytes (``handle`` at their start) against the CRC-32 the archive records: a memory map skips
    zipfile's own check, and a flipped bit in the data would go unnoticed (values silently wrong)."""
    crc, left = 0, member.compress_size
    while left > 0:
        chunk = handle.read(min(left, 1 << 24))
        if not chunk:
            break
        crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    if left or crc != member.CRC:
        raise UserInputError(f"{path}: array {member.filename!r} is corrupt (its CRC-32 does not match the archive's"
                             f"{'; the file is truncated' if left else ''}); copy or write the file again")


def _mapped(path: Path, member: zipfile.ZipInfo | None) -> np.ndarray | None:
    """A stored (uncompressed) ``.npy`` member of a zip file as a read-only memory map (its CRC checked first), or
    None."""
    if member is None or member.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as handle:
        handle.seek(member.header_offset)
        local = handle.read(30)  # the local file header: its name and extra field lengths are at bytes 26..29
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        handle.seek(member.header_offset + 30 + name_len + extra_len)
        _check_crc(handle, path, member)
        handle.seek(member.header_offset + 30 + name_len + extra_len)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        reader = readers.get(np.lib.format.read_magic(handle))
        if reader is None:
            return None
        shape, fortran, dtype = reader(handle)
        if dtype.hasobject:
            return None
        offset = handle.tell()
    if not int(np.prod(shape, dtype=np.int64)):
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
