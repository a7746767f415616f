"""Loading, saving and verifying ONNX models.

* ``load_model`` reads a model with its external data and turns every way a file can be wrong (missing, not ONNX,
  truncated, external data missing) into a :class:`~graph_ops.errors.UserInputError` that names the file.
* ``save_model`` writes atomically: to a temporary file in the target directory, then ``os.replace``; a failure leaves
  no partial output. Models over 1.8 GB are written with external data. ``atomic_write_files`` writes several files
  all or nothing (a model with its plan and report).
* ``verify_model`` runs ``onnx.checker.check_model(full_check=True)`` (which includes strict shape inference).
* ``check_writable`` is the one guard of every output path: never an input (compared by resolved path and by inode,
  so symlinks and hard links count), never inside an input folder, never anything but a regular file or a new path
  (a device node or FIFO is refused, not replaced), a name the file system takes, a directory that takes a new file.
* ``read_text`` reads a small text input (plan, scores, task map, config) with one clear error for a missing,
  unreadable or non-UTF-8 file; ``check_finite_weights`` refuses a model with NaN weights (or infinite layer weights).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graph_ops.errors import UserInputError, VerificationError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Models at least this large (bytes) are saved with their weights in a ``.data`` file beside them."""

NAME_MAX = 255
"""The longest file name (bytes) the usual file systems take (ext4, xfs, btrfs, APFS, NTFS)."""

LAYER_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
"""Ops whose constant inputs are layer weights: infinite values there are refused too (elsewhere an infinity may be a
deliberate constant, e.g. a Clip bound or an attention mask)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file's bytes (the model identity used by plans and statistics)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model with its external data, with a clear error for every bad file."""
    path = Path(path)
    if not _exists(path):
        raise UserInputError(f"model file not found: {path}")
    if path.is_dir():
        raise UserInputError(f"model path is a directory, expected an .onnx file: {path}")
    if not path.is_file():  # a FIFO would block the read forever, a device read garbage
        raise UserInputError(f"model path {path} is not a regular file (a device, FIFO or socket); give an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as err:
        raise UserInputError(f"external data of {path} not found ({err.filename}); keep it beside the model") from err
    except Exception as err:  # protobuf raises several unrelated types for a broken file
        raise UserInputError(f"{path} is not a readable ONNX model (truncated or another format): {err}") from err
    if not model.graph.node and not model.graph.output:
        raise UserInputError(f"{path} is not an ONNX model: it has no graph (is it another format?)")
    return model


def _exists(path: Path) -> bool:
    """``path.exists()`` that says False (instead of raising) for a name the file system cannot even look up."""
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` name one file: the same resolved path (symlinks followed), or the same inode (hard
    links, bind mounts)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop
        pass
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when ``path`` lies (after resolving symlinks) inside the existing directory ``folder``."""
    try:
        folder = Path(folder).resolve()
        return folder.is_dir() and Path(path).resolve().is_relative_to(folder)
    except (OSError, RuntimeError):
        return False


def check_name(out: str | os.PathLike[str]) -> Path:
    """Refuse a file name longer than the file system takes (``NAME_MAX`` bytes), before any work."""
    out = Path(out)
    size = len(os.fsencode(out.name))
    if size > NAME_MAX:
        raise UserInputError(f"output file name {out.name[:32]}... is {size} bytes long; file systems take at most "
                             f"{NAME_MAX}: choose a shorter name")
    return out


def check_writable(out: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> Path:
    """Check an output path before any work (see the module docstring): not an input file (same resolved path or
    same inode), not inside an input folder, not a directory, device node, FIFO or socket, a name of at most
    ``NAME_MAX`` bytes, and its directory exists and takes a new file (tried: a temporary file is created there and
    removed, which also catches read-only file systems and permissions that ``os.access`` reports wrongly, e.g. for
    root).

    ``inputs`` may contain ``None`` for optional inputs that were not given.
    """
    out = check_name(out)
    for item in inputs:
        if item is None:
            continue
        if same_file(out, item):
            raise UserInputError(f"output path {out} is the input file {item}; choose another path (inputs are "
                                 "never overwritten)")
        if is_inside(out, item):
            raise UserInputError(f"output path {out} is inside the input folder {item}; write it elsewhere (inputs "
                                 "are never modified)")
    if out.is_dir():
        raise UserInputError(f"output path {out} is a directory; give a file path")
    if _exists(out) and not _is_regular(out):
        raise UserInputError(f"output path {out} is not a regular file (a device, FIFO or socket) and would be "
                             "replaced; give a new path or a regular file")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"output directory does not exist: {parent}; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".probe", dir=parent)
    except OSError as err:
        raise UserInputError(f"output directory is not writable: {parent} ({err.strerror or err}); choose another "
                             "output path") from err
    os.close(fd)
    os.unlink(probe)
    return out


def check_writable_dir(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` when missing and check that it takes a new file (before any work); ``what`` names it in
    the error (e.g. ``--latency-cache``)."""
    folder = Path(folder)
    if _exists(folder) and not folder.is_dir():
        raise UserInputError(f"{what} {folder} is not a folder; give a folder (it is created when missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".diprune.", suffix=".probe", dir=folder)
    except OSError as err:
        raise UserInputError(f"{what} {folder} is not writable ({err.strerror or err}); choose another folder") \
            from err
    os.close(fd)
    os.unlink(probe)
    return folder


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:  # a dangling symlink: the write creates its target, a regular file
        return True


def _temp_prefix(path: Path) -> str:
    """A temporary file's name prefix beside ``path``: short whatever the name's length (``NAME_MAX``)."""
    return f".{path.name[:32]}."


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of a small input file (``what`` names it: "plan file", "scores file", ...), or one clear
    UserInputError: missing, not a regular file, unreadable, or not UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        reason = "not found" if not _exists(path) else "not a regular file"
        raise UserInputError(f"{what} {reason}: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserInputError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                             "is it the right file?") from err


def non_finite_weights(model: onnx.ModelProto) -> Iterable[tuple[str, str]]:
    """``(initializer name, what)`` for every float initializer with NaN values, and for every layer weight
    (an input of ``LAYER_WEIGHT_OPS``) with infinite values."""
    layer_inputs = {name for node in model.graph.node if node.op_type in LAYER_WEIGHT_OPS for name in node.input}
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node if node.op_type == "Constant"
                for a in node.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(tensor)
        if np.isnan(values).any():
            yield tensor.name, "NaN"
        elif tensor.name in layer_inputs and np.isinf(values).any():
            yield tensor.name, "infinite"


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def check_finite_weights(model: onnx.ModelProto, source: str | os.PathLike[str]) -> None:
    """Refuse a model with NaN weights or infinite layer weights (its outputs would be NaN: every accuracy, score
    and plan computed from it would be silently wrong), naming the first bad initializers."""
    bad = []
    for name, kind in non_finite_weights(model):
        bad.append(f"{name} ({kind})")
        if len(bad) == 3:
            break
    if bad:
        raise UserInputError(f"{source} has non-finite weights: {', '.join(bad)}; the model is broken (a diverged "
                             "training or a bad conversion): export it again")


def _regular_target(path: str | os.PathLike[str]) -> Path:
    """``path`` when a write may replace it: a new path or a regular file (never a device node, FIFO or socket)."""
    path = check_name(path)
    if _exists(path) and not path.is_dir() and not _is_regular(path):
        raise UserInputError(f"cannot write {path}: it is not a regular file (a device, FIFO or socket)")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = _regular_target(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.resolve().parent)
    except OSError as err:
        raise UserInputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise UserInputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files as one: every file goes to a temporary file beside its target first, then all are renamed
    into place; when any write or rename fails, none of the new files is left behind (a file that one of them had
    replaced is not restored; renames fail only in rare races, after every file was written).

    Raises:
        UserInputError: a target cannot be written (the message names it).
    """
    staged: list[tuple[str, Path]] = []
    placed: list[Path] = []
    current = next(iter(files), Path("."))
    try:
        for current, data in files.items():
            _regular_target(current)
            if current.is_dir():
                raise UserInputError(f"cannot write {current}: it is a directory")
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(current), suffix=".tmp",
                                        dir=current.resolve().parent)
            staged.append((tmp, current))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, current in staged:
            os.replace(tmp, current)
            placed.append(current)
    except OSError as err:
        _discard(staged, placed)
        raise UserInputError(f"cannot write {current}: {err.strerror or err}; nothing was written") from err
    except BaseException:
        _discard(staged, placed)
        raise


def _discard(staged: list[tuple[str, Path]], placed: list[Path]) -> None:
    for tmp, _ in staged:
        Path(tmp).unlink(missing_ok=True)
    for path in placed:
        path.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Save a model atomically; large models get their weights in ``<name>.data`` beside them."""
    path = Path(path)
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        atomic_write_bytes(path, model.SerializeToString())
        return path
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".diprune-", dir=path.resolve().parent))
    except OSError as err:
        raise UserInputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        tmp_model = tmp_dir / path.name
        onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        os.replace(tmp_dir / f"{path.name}.data", path.with_name(f"{path.name}.data"))
        os.replace(tmp_model, path)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()
    return path


def verify_model(model: onnx.ModelProto) -> None:
    """Run the full ONNX checker (with strict shape inference); raise VerificationError on failure."""
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model, full_check=True)
        else:  # the checker needs a path for models over 2 GB
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "model.onnx"
                onnx.save_model(model, str(target), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(target), full_check=True)
    except Exception as err:
        raise VerificationError(f"model failed onnx.checker full check: {err}") from err
