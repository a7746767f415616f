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
    assert not top & {"torch", "torchvision", "tensorrt", "pycuda", "polygraphy", "matplotlib", "ray"}


def test_ray_is_imported_by_the_cluster_module_only() -> None:
    users = [p.relative_to(ROOT).as_posix() for p in GRAPH_OPS + PIPELINE if "ray" in _imports(p)]
    assert users == ["pipeline/cluster.py"]


@pytest.mark.parametrize(
    "path",
    [p for p in PIPELINE if p.name in {"stats.py", "plan.py"} or p.parent.name == "scorers"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_statistics_and_scoring_do_not_touch_graph_libraries(path: Path) -> None:
    assert not _imports(path) & {"onnx_graphsurgeon", "onnx"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_edges(paths: list[Path], package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in the file, late imports included).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
    """
    modules = {_module_name(p): p for p in paths}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            edges[name].update(t for t in targets if t in modules and t != name and t.split(".")[0] == package)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a list of modules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.mark.parametrize(("package", "paths"), [("graph_ops", GRAPH_OPS), ("pipeline", PIPELINE)],
                         ids=["graph_ops", "pipeline"])
def test_no_import_cycles_inside_a_package(package: str, paths: list[Path]) -> None:
    cycle = _cycle(_internal_edges(paths, package))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_onnxruntime_sessions_live_in_the_runtime_module() -> None:
    """One onnxruntime home: only pipeline/model/runtime.py creates sessions (engines.py keeps TensorRT); the board-side
    profiler that ``diprune latency variants`` copies next to the variants must run without diprune, so it makes its
    own (and imports nothing of the package)."""
    creators = [p for p in GRAPH_OPS + PIPELINE if "InferenceSession(" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in creators] == ["pipeline/deployment/ort_profile_script.py",
                                                                   "pipeline/model/runtime.py"]
    board = (ROOT / "pipeline" / "deployment" / "ort_profile_script.py").read_text()
    assert "from pipeline" not in board and "import pipeline" not in board and "graph_ops" not in board


# Which stage package may import which (modules at the top of pipeline/ are their own entries). A package imports
# only what lies below it: data is the floor, cli the roof. Lazy imports count too.
TOP = ("errors", "choices", "locks", "memory")
ALLOWED: dict[str, set[str]] = {
    "errors": set(), "choices": set(), "locks": set(), "memory": set(),
    "data": {*TOP},
    "model": {"data", *TOP},
    "calibration": {"model", "data", "cluster", *TOP},
    "selection": {"calibration", "model", "data", *TOP},
    "recovery": {"model", "data", "cluster", *TOP},
    "evaluation": {"model", "data", *TOP},
    "deployment": {"selection", "calibration", "model", "data", *TOP},
    "training": {"evaluation", "selection", "calibration", "model", "data", *TOP},
    "prune": {"training", "evaluation", "deployment", "recovery", "selection", "calibration", "model", "data",
              "cluster", *TOP},
    "job": {"prune", "training", "evaluation", "deployment", "recovery", "selection", "calibration", "model", "data",
            "cluster", *TOP},
    "cli": {"job", "prune", "training", "evaluation", "deployment", "recovery", "selection", "calibration", "model",
            "data", "cluster", *TOP},
    # the Ray executor of calibration and recovery shards: imported lazily by both, it runs their shard work
    "cluster": {"recovery", "calibration", "data", *TOP},
}


def _stage(module: str) -> str:
    """The entry of ALLOWED a module of pipeline belongs to (``pipeline.data.npz`` -> ``data``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pipeline"


def test_every_stage_package_and_top_module_is_in_the_table() -> None:
    tops = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {"__init__"}
    packages = {p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py")}
    assert tops | packages == set(ALLOWED)
    assert len(list((ROOT / "pipeline").glob("*.py"))) <= 12


@pytest.mark.parametrize("package", sorted(p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py")))
def test_each_stage_package_says_what_it_holds_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / package / "__init__.py").read_text())) or ""
    assert doc and ("May import" in doc or "may import" in doc or package in {"recovery", "cli"}), package


def test_stage_packages_import_only_what_lies_below_them() -> None:
    edges = _internal_edges(PIPELINE, "pipeline")
    wrong = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                   if _stage(a) != _stage(b) and _stage(b) != "pipeline" and _stage(b) not in ALLOWED[_stage(a)])
    assert not wrong, wrong


def test_no_module_is_over_500_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n}" for p in GRAPH_OPS + PIPELINE
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long
