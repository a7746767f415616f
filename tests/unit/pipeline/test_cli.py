"""The CLI contract: inspect/apply forms, the plan file, and one clear error line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graph_ops.channels import analyze
from graph_ops.io import sha256_file
from pipeline.cli import main
from tests.graphs import tiny_classifier


def _tiny_model(path: Path) -> Path:
    """input(1x3x8x8) -> Conv(8) -> Relu -> Conv(16) -> Relu -> GAP -> Flatten -> Gemm(10) -> logits."""
    return Path(tiny_classifier(str(path), in_channels=3, widths=(8, 16), classes=10))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _tiny_model(tmp_path / "tiny.onnx")


def _groups(path: Path) -> dict[str, object]:
    index = analyze(onnx.load(str(path)))
    return {g.id: g for g in index.groups}


def _write_plan(path: Path, sha: str, groups: dict[str, dict[str, list[int]]]) -> Path:
    path.write_text(json.dumps({"format": "diprune.plan/1", "model_sha256": sha, "groups": groups}))
    return path


def _first_prunable(path: Path) -> tuple[str, int]:
    group = next(g for g in _groups(path).values() if g.prunable)
    return group.id, group.size


def test_inspect_json_is_one_object_with_groups(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "inspect", str(tiny), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_sha256"] == sha256_file(tiny)
    assert info["macs"] > 0 and info["params"] > 0
    by_id = {g["id"]: g for g in info["groups"]}
    assert set(by_id) == set(_groups(tiny))
    assert all({"id", "size", "frozen", "producers", "consumers"} <= set(g) for g in info["groups"])
    assert any(g["frozen"] is None for g in info["groups"])
    assert all(g["frozen"] is None or isinstance(g["frozen"], str) for g in info["groups"])


def test_apply_removes_channels_and_mask_only_matches(tiny: Path, tmp_path: Path) -> None:
    gid, _ = _first_prunable(tiny)
    keep = [0, 2, 3, 5]
    plan = _write_plan(tmp_path / "plan.json", sha256_file(tiny), {gid: {"keep": keep}})
    pruned, masked = tmp_path / "pruned.onnx", tmp_path / "masked.onnx"
    assert main(["-q", "apply", str(tiny), str(plan), "-o", str(pruned)]) == 0
    assert main(["-q", "apply", str(tiny), str(plan), "-o", str(masked), "--mask-only"]) == 0
    onnx.checker.check_model(onnx.load(str(pruned)), full_check=True)
    feeds = {"input": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    a = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(str(masked), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    assert pruned.stat().st_size < masked.stat().st_size
    weights = {i.name: i for i in onnx.load(str(pruned)).graph.initializer}
    assert any(list(w.dims)[:1] == [len(keep)] for w in weights.values())


def _run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("diprune: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "not found"),
        ("not_onnx", "not a readable ONNX model"),
        ("truncated", "not a readable ONNX model"),
    ],
    ids=["missing-file", "not-onnx", "truncated"],
)
def test_bad_model_files(case: str, expected: str, tiny: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / f"{case}.onnx"
    if case == "not_onnx":
        target.write_text("this is a text file, not a protobuf\n" * 10)
    elif case == "truncated":
        target.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    line = _run_error(["-q", "inspect", str(target)], capsys)
    assert expected in line
    assert str(target.name) in line


def _plan_case(case: str, tiny: Path, tmp_path: Path) -> Path:
    sha = sha256_file(tiny)
    gid, size = _first_prunable(tiny)
    frozen = next(g.id for g in _groups(tiny).values() if not g.prunable)
    groups = {
        "sha": ("0" * 64, {gid: {"keep": [0, 1]}}),
        "range": (sha, {gid: {"keep": [0, size]}}),
        "duplicate": (sha, {gid: {"keep": [1, 1, 2]}}),
        "empty": (sha, {gid: {"keep": []}}),
        "frozen": (sha, {frozen: {"keep": [0]}}),
        "unknown": (sha, {"no_such_group": {"keep": [0]}}),
    }[case]
    return _write_plan(tmp_path / f"{case}.json", groups[0], groups[1])


@pytest.mark.parametrize(
    ("case", "expected"),
    [("sha", "plan was made for model"), ("range", "out of range"), ("duplicate", "twice"),
     ("empty", "keeps no channel"), ("frozen", "frozen"), ("unknown", "no_such_group")],
    ids=["sha-mismatch", "index-out-of-range", "duplicate-index", "empty-keep", "frozen-group", "unknown-group"],
)
def test_bad_plans_leave_no_output(case: str, expected: str, tiny: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = tiny.read_bytes()
    plan = _plan_case(case, tiny, tmp_path)
    out = tmp_path / "out.onnx"
    line = _run_error(["-q", "apply", str(tiny), str(plan), "-o", str(out)], capsys)
    assert expected in line
    assert not out.exists()
    assert tiny.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]


def test_plan_that_is_not_json(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{not json")
    line = _run_error(["-q", "apply", str(tiny), str(plan), "-o", str(tmp_path / "o.onnx")], capsys)
    assert "plan.json" in line


def test_output_equal_to_input_is_refused(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tiny.read_bytes()
    gid, _ = _first_prunable(tiny)
    plan = _write_plan(tmp_path / "plan.json", sha256_file(tiny), {gid: {"keep": [0, 1]}})
    line = _run_error(["-q", "apply", str(tiny), str(plan), "-o", str(tiny)], capsys)
    assert "input" in line
    assert tiny.read_bytes() == before


@pytest.mark.parametrize("where", ["missing-dir", "unwritable"])
def test_unwritable_output(where: str, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gid, _ = _first_prunable(tiny)
    plan = _write_plan(tmp_path / "plan.json", sha256_file(tiny), {gid: {"keep": [0, 1]}})
    out = tmp_path / "no" / "such" / "dir" / "o.onnx" if where == "missing-dir" else Path("/proc/diprune-out.onnx")
    line = _run_error(["-q", "apply", str(tiny), str(plan), "-o", str(out)], capsys)
    assert str(out.parent) in line or str(out) in line
    assert not out.exists()


def test_console_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("diprune")
    result = subprocess.run([str(exe), "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("diprune: error:")
    assert "Traceback" not in result.stderr


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune"])
    assert exc.value.code == 2


@pytest.mark.parametrize(("extra", "multiple"), [([], 8), (["--backend", "tensorrt", "--precision", "int8"], 32),
                                                 (["--round-to", "4"], 4)], ids=["ort-cpu", "trt-int8", "explicit"])
def test_round_to_default_follows_the_deployment_target(extra: list[str], multiple: int, tmp_path: Path) -> None:
    """Also covers ``score`` of a data-free method without a statistics file."""
    model = Path(tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(64, 64), classes=10))
    scores = tmp_path / "s.json"
    assert main(["-q", "score", "--model", str(model), "--method", "l2", "-o", str(scores)]) == 0
    plan = tmp_path / "p.json"
    assert main(["-q", "plan", str(scores), "--target-macs", "0.5", "--prune-ends", *extra, "-o", str(plan)]) == 0
    doc = json.loads(plan.read_text())
    fine = doc["meta"]["fine_steps"]  # a group holding a large share of the cost steps by half the multiple
    kept = {gid: len(g["keep"]) for gid, g in doc["groups"].items()}
    assert kept
    assert all(k % (multiple // 2 if gid in fine else multiple) == 0 for gid, k in kept.items())
