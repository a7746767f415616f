"""Process memory settings: the CLI's process turns numpy's huge-page advice off, unless the user chose with numpy's
own variable; the values computed are the same either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import memory
from pipeline.cli import main
from tests.graphs import tiny_classifier

_set_advice = memory.set_huge_page_advice


@pytest.fixture
def advice_on():
    before = _set_advice(True)
    yield
    _set_advice(before)


def test_the_advice_is_turned_off_unless_numpy_madvise_hugepage_is_set(advice_on, monkeypatch) -> None:
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    assert memory.no_huge_page_advice() is True  # it was on
    assert _set_advice(True) is False  # and is off now
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert memory.no_huge_page_advice() is False
    assert _set_advice(True) is True  # the user's choice stood


def test_every_cli_command_runs_without_the_advice(advice_on, monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    model = tiny_classifier(str(tmp_path / "tiny.onnx"), in_channels=3, widths=(8, 16), classes=10)
    assert main(["-q", "inspect", model, "--json"]) == 0
    assert _set_advice(True) is False
    capsys.readouterr()
