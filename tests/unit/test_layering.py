"""Architecture rules from the style guide, checked by parsing imports (no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


GRAPH_OPS = sorted((ROOT / "graph_ops").glob("*.py"))
PIPELINE = sorted((ROOT / "pipeline").rglob("*.py"))


@pytest.mark.parametrize("path", GRAPH_OPS, ids=lambda p: p.name)
def test_graph_ops_never_imports_pipeline(path: Path) -> None:
    assert "pipeline" not in _imports(path)


@pytest.mark.parametrize("path", GRAPH_OPS + PIPELINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_heavy_optional_parts_are_imported_lazily(path: Path) -> None:
    top = _module_level_imports(path)
    assert not top & {"torch", "torchvision", "tensorrt", "pycuda", "polygraphy", "matplotlib"}


@pytest.mark.parametrize(
    "path",
    [p for p in PIPELINE if p.name in {"stats.py", "plan.py"} or p.parent.name == "scorers"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_statistics_and_scoring_do_not_touch_graph_libraries(path: Path) -> None:
    assert not _imports(path) & {"onnx_graphsurgeon", "onnx"}
