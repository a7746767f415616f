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
