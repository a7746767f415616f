"""The staged CLI (calibrate -> score -> plan -> apply) and the one-shot ``prune`` agree, on the shipped model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.cost import count
from pipeline.cli import main
from pipeline.prune.demo import demo_model_path

CALIB = ["--data", "mnist", "--limit", "400"]
pytestmark = pytest.mark.slow  # each runs the real pipeline on the shipped model (1-3 s)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copy(demo_model_path(), path)
    return path


def _run(argv: list[str]) -> None:
    assert main(["-q", *argv]) == 0


def test_staged_chain_equals_one_shot_prune(model: Path, tmp_path: Path) -> None:
    stats, scores, plan = tmp_path / "s.npz", tmp_path / "scores.json", tmp_path / "plan.json"
    _run(["calibrate", str(model), *CALIB, "-o", str(stats)])
    _run(["score", str(stats), "--model", str(model), "--method", "di", "-o", str(scores)])
    _run(["plan", str(scores), "--target-macs", "0.6", "-o", str(plan)])
    _run(["apply", str(model), str(plan), "-o", str(tmp_path / "staged.onnx")])
    _run(["prune", str(model), *CALIB, "--method", "di", "--target-macs", "0.6", "--allocation", "rule", "-o",
          str(tmp_path / "one.onnx")])  # 'plan' has no data to measure with: the rule allocation

    staged = json.loads(plan.read_text())
    one_shot = json.loads((tmp_path / "one.onnx.plan.json").read_text())
    assert staged["format"] == "diprune.plan/1"
    assert staged["groups"] == one_shot["groups"]
    assert staged["model_sha256"] == one_shot["model_sha256"]
    a, b = onnx.load(str(tmp_path / "staged.onnx")), onnx.load(str(tmp_path / "one.onnx"))
    assert count(a).macs == count(b).macs < count(onnx.load(str(model))).macs


def test_prune_report_has_budget_achievement_groups_and_timings(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    _run(["prune", str(model), *CALIB, "--method", "di", "--target-macs", "0.5", "--eval-data", "mnist", "-o",
          str(out)])
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["format"] == "diprune.report/1"
    assert report["method"] == "di"
    assert report["budget"]["target_macs"] == 0.5
    assert 0.3 < report["macs_fraction"] <= 0.5
    assert report["pruned"]["macs"] == count(onnx.load(str(out))).macs
    assert {"analyze", "calibrate", "score", "plan", "apply", "evaluate"} <= set(report["timings_s"])
    assert any(g["kept"] < g["size"] for g in report["groups"].values())
    fine = json.loads(Path(f"{out}.plan.json").read_text())["meta"]["fine_steps"]  # groups allowed finer steps
    assert all(g["kept"] % fine.get(gid, 8) == 0 or g["kept"] == g["size"] for gid, g in report["groups"].items())
    ev = report["evaluation"]
    assert ev["original"]["n"] == ev["pruned"]["n"] == 400  # --limit applies to each dataset
    assert ev["original"]["top1"] > 0.97
    assert 0.0 <= ev["pruned"]["agreement"] <= 1.0


def test_two_runs_give_byte_identical_plans(model: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _run(["prune", str(model), *CALIB, "--method", "di", "--target-macs", "0.5", "-o", str(tmp_path / f"{name}.onnx")])
    assert (tmp_path / "a.onnx.plan.json").read_bytes() == (tmp_path / "b.onnx.plan.json").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_statistics_of_another_model_are_refused(model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    stats = tmp_path / "s.npz"
    _run(["calibrate", str(model), *CALIB, "-o", str(stats)])
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model))
    proto.doc_string = "a different file"
    onnx.save(proto, str(other))
    assert main(["-q", "score", str(stats), "--model", str(other), "-o", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "calibrate this model first" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_labels_out_of_range_are_refused(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), y=np.full(64, 12, dtype=np.int64))
    assert main(["-q", "calibrate", str(model), "--data", str(data), "--split", "all", "-o",
                 str(tmp_path / "s.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diprune: error:")
    assert "12" in err
    assert not (tmp_path / "s.npz").exists()


def test_eval_prints_accuracy_agreement_and_logit_error(model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.onnx"
    _run(["prune", str(model), *CALIB, "--target-macs", "0.5", "-o", str(out)])
    capsys.readouterr()
    _run(["eval", str(out), "--data", "mnist", "--limit", "300", "--reference", str(model)])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 300
    assert 0.9 < result["top1"] <= result["top5"] <= 1.0
    assert 0.9 < result["agreement"] <= 1.0
    assert 0.0 < result["relative_logit_error"] < 1.0


def test_prune_report_records_the_default_lstsq_recovery(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    _run(["prune", str(model), *CALIB, "--target-macs", "0.5", "-o", str(out)])
    recovery = json.loads(Path(f"{out}.report.json").read_text())["recovery"]
    assert recovery["method"] == "lstsq" and recovery["mode"] == "sequential"
    assert recovery["consumers"] and all(c["error_after"] <= c["error_before"] for c in recovery["consumers"])
    assert {c["op_type"] for c in recovery["consumers"]} == {"Conv", "Gemm"}
