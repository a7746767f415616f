"""The README's Python example runs as written (on the shipped model, in a temporary directory)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_python_api_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        namespace: dict[str, object] = {}
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "pruned.onnx").is_file()
    assert (tmp_path / "pruned.onnx.report.json").is_file()
    report = namespace["report"]
    assert 0.3 < report.macs_fraction <= 0.5
    assert namespace["pruned"].graph.output[0].name == "logits"


def test_cli_section_lists_every_subcommand() -> None:
    from pipeline.cli import build_parser

    text = README.read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"diprune {name}" not in text]
    assert not missing
