"""Loading, saving and verifying ONNX models.

* ``load_model`` reads a model with its external data and turns every way a file can be wrong (missing, not ONNX,
  truncated, external data missing) into a :class:`~graph_ops.errors.UserInputError` that names the file.
* ``save_model`` writes atomically: to a temporary file in the target directory, then ``os.replace``; a failure leaves
  no partial output. Models over 1.8 GB are written with external data. ``atomic_write_files`` writes several files
  all or nothing (a model with its plan and report).
* ``verify_model`` runs ``onnx.checker.check_model(full_check=True)`` (which includes strict shape inference).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx

from graph_ops.errors import UserInputError, VerificationError

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Models at least this large (bytes) are saved with their weights in a ``.data`` file beside them."""


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
    if not path.exists():
        raise UserInputError(f"model file not found: {path}")
    if path.is_dir():
        raise UserInputError(f"model path is a directory, expected an .onnx file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as err:
        raise UserInputError(f"external data of {path} not found ({err.filename}); keep it beside the model") from err
    except Exception as err:  # protobuf raises several unrelated types for a broken file
        raise UserInputError(f"{path} is not a readable ONNX model (truncated or another format): {err}") from err
    if not model.graph.node and not model.graph.output:
        raise UserInputError(f"{path} is not an ONNX model: it has no graph (is it another format?)")
    return model


def check_writable(out: str | os.PathLike[str], *inputs: str | os.PathLike[str] | None) -> Path:
    """Check an output path before any work: not an input file, not a directory, and its directory exists and takes
    a new file (tried: a temporary file is created there and removed, which also catches read-only file systems and
    permissions that ``os.access`` reports wrongly, e.g. for root).

    ``inputs`` may contain ``None`` for optional inputs that were not given.
    """
    out = Path(out)
    for item in inputs:
        if item is not None and out.resolve() == Path(item).resolve():
            raise UserInputError(f"output path {out} is an input file; choose another path (inputs are never overwritten)")
    if out.is_dir():
        raise UserInputError(f"output path {out} is a directory; give a file path")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserInputError(f"output directory does not exist: {parent}; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as err:
        raise UserInputError(f"output directory is not writable: {parent} ({err.strerror or err}); choose another "
                             "output path") from err
    os.close(fd)
    os.unlink(probe)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
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
            if current.is_dir():
                raise UserInputError(f"cannot write {current}: it is a directory")
            fd, tmp = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=current.resolve().parent)
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
