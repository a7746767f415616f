"""Atomic writes: permissions like an ordinary file, nothing left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from graph_ops.errors import UserInputError
from graph_ops.io import atomic_write_bytes


def test_atomic_write_gives_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_bytes(target, b"{}")
    reference = tmp_path / "plain.json"
    reference.write_bytes(b"{}")
    assert target.read_bytes() == b"{}"
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_atomic_write_into_a_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="cannot write"):
        atomic_write_bytes(tmp_path / "missing" / "out.json", b"{}")
    assert not (tmp_path / "missing").exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write_files_is_all_or_nothing(tmp_path: Path) -> None:
    from graph_ops.io import atomic_write_files

    (tmp_path / "c.json").mkdir()  # the third target cannot be written
    with pytest.raises(UserInputError, match=r"c\.json"):
        atomic_write_files({tmp_path / "a.onnx": b"model", tmp_path / "b.json": b"{}", tmp_path / "c.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
    atomic_write_files({tmp_path / "a.onnx": b"model", tmp_path / "b.json": b"{}"})
    assert (tmp_path / "a.onnx").read_bytes() == b"model" and (tmp_path / "b.json").read_bytes() == b"{}"


def test_check_writable_tries_the_directory(tmp_path: Path) -> None:
    from graph_ops.io import check_writable

    assert check_writable(tmp_path / "out.onnx") == tmp_path / "out.onnx"
    assert os.listdir(tmp_path) == []  # the probe file is gone
    with pytest.raises(UserInputError, match="is a directory"):
        check_writable(tmp_path)
    with pytest.raises(UserInputError, match="not writable"):
        check_writable("/proc/out.onnx")
