"""``diprune run CONFIG`` end to end on the shipped model and data: report, plots, best.onnx, gates, cache."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from pipeline.cli import main
from pipeline.job.config import load_config
from pipeline.prune.demo import demo_model_path

pytestmark = pytest.mark.slow  # the first run prunes, recovers, evaluates and benchmarks two candidates (~10 s)

FAST_BENCH = {"backend": "ort-cpu", "batch": [1, 4], "warmup": 0.02, "duration": 0.1, "iterations": 3, "rounds": 2}


def _config(folder: Path, **changes: Any) -> Path:
    """A small job on the shipped model: di and l2 at half the MACs, lstsq recovery on 128 digits."""
    doc: dict[str, Any] = {
        "model": str(demo_model_path()),
        "data": {"calibration": {"path": "mnist", "limit": 128}, "evaluation": {"path": "mnist", "limit": 400}},
        "prune": {"methods": ["di", "l2"], "target_macs": [0.5], "recover": "lstsq"},
        "bench": FAST_BENCH,
        "gates": {"max_top1_drop": 2, "min_speedup": 0.5},  # points; a pruned model twice as slow: never
        "output": "out",
    }
    for key, value in changes.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _report(output: Path) -> dict[str, Any]:
    return json.loads((output / "report.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """The job run once: (output folder, exit code, stdout)."""
    folder = tmp_path_factory.mktemp("run")
    config = _config(folder)
    capture: list[str] = []
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["-q", "run", str(config)])
    capture.append(buffer.getvalue())
    return folder / "out", code, capture[0]


def _copy_run(first: Path, tmp_path: Path) -> Path:
    shutil.copytree(first, tmp_path / "out")
    return tmp_path / "out"


def test_run_end_to_end(first_run: tuple[Path, int, str]) -> None:
    output, code, stdout = first_run
    assert code == 0
    report = _report(output)
    assert report["format"] == "diprune.run/1" and report["exit_code"] == 0
    names = [c["name"] for c in report["candidates"]]
    assert names == ["di-macs0.5", "l2-macs0.5"]
    original = report["original"]
    assert original["top1"] > 0.97 and original["n"] == 400
    assert [b["batch"] for b in original["latency"]] == [1, 4]
    for c in report["candidates"]:
        assert c["method"] in ("di", "l2") and c["target"] == {"kind": "macs", "fraction": 0.5}
        assert 0.3 < c["macs_fraction"] <= 0.5 and c["budget_reached"]
        assert c["macs"] == pytest.approx(c["macs_fraction"] * original["macs"])
        assert c["top1_drop"] == pytest.approx(original["top1"] - c["top1"])
        assert 0.9 < c["agreement"] <= 1.0
        assert [b["batch"] for b in c["latency"]] == [1, 4]
        assert all(b["median_ms"] > 0 and b["speedup"] > 0 for b in c["latency"])
        assert set(c["passed"]) == {"max_top1_drop", "min_speedup"}
        assert c["passed"]["max_top1_drop"] == (100 * c["top1_drop"] <= 2 + 1e-9)
        assert c["passed"]["min_speedup"] == (min(b["speedup"] for b in c["latency"]) >= 0.5 - 1e-9)
        assert c["passed_all"] == all(c["passed"].values())
        assert (output / c["path"]).is_file() and not c["reused"]
    best = report["best"]
    assert best is not None
    passing = [c for c in report["candidates"] if c["passed_all"]]
    assert best == min(passing, key=lambda c: c["macs_fraction"])["name"]
    assert report["cache"]["calibration"] == "computed" and report["cache"]["candidates_computed"] == 2
    assert {"prepare", "calibrate", "score", "plan", "apply", "recover", "evaluate", "bench"} <= set(
        report["timings_s"])
    assert f"best: {best}" in stdout and "(exit 0)" in stdout
    markdown = (output / "report.md").read_text()
    assert "**PASS** (exit 0)" in markdown and f"**{best}**" in markdown


def test_best_onnx_is_the_best_candidate_and_valid(first_run: tuple[Path, int, str]) -> None:
    output, _, _ = first_run
    report = _report(output)
    best = next(c for c in report["candidates"] if c["name"] == report["best"])
    model = onnx.load(str(output / "best.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert (output / "best.onnx").read_bytes() == (output / best["path"]).read_bytes()
    plan = json.loads((output / "best.onnx.plan.json").read_text())
    assert plan["format"] == "diprune.plan/1" and plan["model_sha256"] == report["original"]["sha256"]
    session = ort.InferenceSession(str(output / "best.onnx"), providers=["CPUExecutionProvider"])
    with np.load(Path(demo_model_path()).with_name("mnist10k.npz")) as data:
        x = ((data["x"][8000:8064] / 255.0 - 0.1307) / 0.3081).astype(np.float32)[:, None]
        y = data["y"][8000:8064]
    assert (session.run(None, {"input": x})[0].argmax(1) == y).mean() > 0.9


def test_plots_are_written(first_run: tuple[Path, int, str]) -> None:
    pytest.importorskip("matplotlib", reason="plots need the [plots] extra (matplotlib)")
    output, _, _ = first_run
    plots = _report(output)["plots"]
    assert set(plots) == {"accuracy_vs_macs", "accuracy_vs_latency", "kept_width"}
    for relative in plots.values():
        assert (output / relative).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({relative})" in (output / "report.md").read_text()


def test_pareto_fronts_are_consistent(first_run: tuple[Path, int, str]) -> None:
    report = _report(first_run[0])
    points = [(c["macs_fraction"], c["top1"]) for c in report["candidates"]] + [(1.0, report["original"]["top1"])]
    for c in report["candidates"]:
        dominated = any(x <= c["macs_fraction"] and y >= c["top1"] and (x, y) != (c["macs_fraction"], c["top1"])
                        for x, y in points)
        assert c["pareto"]["macs"] == (not dominated)


def test_rerun_with_one_more_target_reuses_the_calibration(first_run: tuple[Path, int, str], tmp_path: Path) -> None:
    output = _copy_run(first_run[0], tmp_path)
    config = _config(tmp_path, prune={"methods": ["di"], "target_macs": [0.5, 0.35]})
    assert main(["-q", "run", str(config)]) == 0
    report = _report(output)
    cache = report["cache"]
    assert cache["calibration"] == "reused"
    assert (cache["candidates_reused"], cache["candidates_computed"]) == (1, 1)
    assert "calibrate" not in report["timings_s"]  # no calibration ran, by the stage timings
    assert report["timings_s"]["recover"] > 0  # the new candidate was made (from the cached statistics)
    reused = {c["name"]: c for c in report["candidates"] if c["reused"]}
    assert set(reused) == {"di-macs0.5"}
    first = {c["name"]: c for c in _report(first_run[0])["candidates"]}
    assert reused["di-macs0.5"]["sha256"] == first["di-macs0.5"]["sha256"]
    assert [c["name"] for c in report["candidates"] if not c["reused"]] == ["di-macs0.35"]


def test_impossible_gate_exits_3_and_still_writes_the_report(first_run: tuple[Path, int, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    output = _copy_run(first_run[0], tmp_path)
    assert (output / "best.onnx").is_file()  # from the first run; must not survive a failing run
    config = _config(tmp_path, gates={"min_speedup": 100.0})
    assert main(["-q", "run", str(config)]) == 3
    assert "no candidate passes every gate (exit 3)" in capsys.readouterr().out
    report = _report(output)
    assert report["best"] is None and report["exit_code"] == 3
    assert all(not c["passed"]["min_speedup"] and not c["passed_all"] for c in report["candidates"])
    assert not (output / "best.onnx").exists() and not (output / "best.onnx.plan.json").exists()
    assert "**FAIL** (exit 3)" in (output / "report.md").read_text()


def test_the_minimal_config_of_the_issue(tmp_path: Path) -> None:
    (tmp_path / "path" / "to").mkdir(parents=True)
    text = """
model: path/to/model.onnx            # or: {export: "torchvision:resnet18", input_shape: [1, 3, 224, 224]}
data: {calibration: calib.npz, evaluation: test.npz}   # same forms as --data (npz, image folder, mnist)
prune: {methods: [di, l2], target_macs: [0.5, 0.25], recover: lstsq}
bench: {backend: ort-cpu, batch: [1]}
gates: {max_top1_drop: 1, min_speedup: 1.3}
output: runs/exp1
"""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.model.path == tmp_path / "path/to/model.onnx"
    assert config.calibration is not None and config.calibration.source == str(tmp_path / "calib.npz")
    assert config.evaluation.source == str(tmp_path / "test.npz")
    assert config.prune.methods == ("di", "l2") and config.prune.targets == (("macs", 0.5), ("macs", 0.25))
    assert config.prune.recover == "lstsq"
    assert config.bench.backend == "ort-cpu" and config.bench.batch == (1,)
    assert dict(config.gates) == {"max_top1_drop": 1, "min_speedup": 1.3}
    assert config.output == tmp_path / "runs/exp1"
    export = load_config(_write(tmp_path, text.replace("model: path/to/model.onnx",
                                                       'model: {export: "torchvision:resnet18", input_shape: '
                                                       '[1, 3, 224, 224]}')))
    assert export.model.export == "torchvision:resnet18" and export.model.input_shape == (1, 3, 224, 224)


def _write(folder: Path, text: str) -> Path:
    path = folder / "other.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["prune"].update(method="di"), "unknown key 'prune.method' (did you mean 'methods'?)"),
    (lambda d: d["gates"].update(max_top1_dorp=0.01), "did you mean 'max_top1_drop'"),
    (lambda d: d["prune"].pop("target_macs"), "give a budget"),
    (lambda d: d["prune"].update(target_macs=[1.5]), "'prune.target_macs' must be in (0.0, 1.0]"),
    (lambda d: d["prune"].update(methods=["nope"]), "'prune.methods' is 'nope'"),
    (lambda d: d["bench"].update(batch=[0]), "'bench.batch' must be in [1"),
    (lambda d: d["data"].pop("evaluation"), "'data.evaluation' is missing"),
    (lambda d: d.pop("output"), "'output' is missing"),
    (lambda d: d.update(task={"classes": [3, 8], "map": {"a": [1], "b": [2]}}), "either 'classes"),
    (lambda d: d.update(task={"classes": [3]}), "at least two classes"),
    (lambda d: d.update(task={"map": {"odd": [1, 3]}}), "at least two non-empty groups"),
    (lambda d: d.update(task={"map": "missing.json"}), "task map file not found"),
    (lambda d: d["prune"].update(max_drop=-1), "'prune.max_drop' must be in [0.0"),
    (lambda d: d["prune"].update(workers=0), "'prune.workers' must be in [1"),
    (lambda d: d["prune"].update(shard_batches=0), "'prune.shard_batches' must be in [1"),
], ids=["prune-typo", "gate-typo", "no-budget", "budget-range", "unknown-method", "batch-0", "no-evaluation",
        "no-output", "task-both", "task-one-class", "task-one-group", "task-map-missing", "max-drop-negative",
        "workers-0", "shard-batches-0"])
def test_config_mistakes_are_one_error_line(change: Callable[[dict], Any], expected: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(_config(tmp_path).read_text())
    change(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["-q", "run", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diprune: error: config") and expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_not_yaml_and_accuracy_gate_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["-q", "run", str(bad)]) == 1
    assert "is not valid YAML" in capsys.readouterr().err
    with np.load(Path(demo_model_path()).with_name("mnist10k.npz")) as data:
        np.savez(tmp_path / "unlabelled.npz", x=data["x"][:50])
    config = _config(tmp_path, data={"evaluation": "unlabelled.npz"})
    assert main(["-q", "run", str(config)]) == 1
    err = capsys.readouterr().err
    assert "need labelled evaluation data" in err and "min_agreement" in err
    assert not list((tmp_path / "out" / "candidates").iterdir())  # refused before any candidate was made


def test_plots_skipped_without_matplotlib_is_stated(tmp_path: Path) -> None:
    config = _config(tmp_path, data={"calibration": None}, prune={"methods": ["l2"], "recover": "none"}, gates=None)
    code = ("import sys; sys.modules['matplotlib'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['-q', 'run', {str(config)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = _report(tmp_path / "out")
    assert "matplotlib is not installed" in report["plots"]["skipped"]
    assert "Plots were skipped: matplotlib is not installed" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "plots").exists()
    assert report["cache"]["calibration"] == "not needed"


def test_run_exports_a_factory_model_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="model: {export: ...} needs the [torch] extra")
    (tmp_path / "net.py").write_text(
        "import torch\n\n\ndef digits():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(\n"
        "        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),\n"
        "        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))\n")
    model = {"export": "net.py:digits", "input_shape": [1, 1, 28, 28], "exporter": "legacy"}
    config = _config(tmp_path, model=model, data={"calibration": None, "evaluation": {"path": "mnist", "limit": 100}},
                     prune={"methods": ["l2"], "recover": "none", "prune_ends": True}, gates=None)
    assert main(["run", str(config)]) == 0
    first = capsys.readouterr().err
    assert "parity torch vs onnxruntime" in first and ": ok" in first
    report = _report(tmp_path / "out")
    assert Path(report["original"]["path"]).parent == tmp_path / "out" / "cache"
    assert report["candidates"][0]["macs_fraction"] <= 0.5
    assert main(["run", str(config)]) == 0
    assert "reused from the cache" in capsys.readouterr().err.split("\n")[0]


def test_task_config_forms(tmp_path: Path) -> None:
    doc = yaml.safe_load(_config(tmp_path).read_text())
    doc["prune"] = {"methods": ["di"], "max_drop": 1}  # a search alone is a budget
    (tmp_path / "parity.json").write_text(json.dumps({"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6, 8]}))
    for task, expected in [({"classes": [3, 8]}, {"classes": [3, 8]}),
                           ({"map": {"low": [0, 1, 2], "high": [7, 8, 9]}}, {"groups": [["low", [0, 1, 2]],
                                                                                         ["high", [7, 8, 9]]]}),
                           ({"map": "parity.json"}, {"groups": [["odd", [1, 3, 5, 7, 9]], ["even", [0, 2, 4, 6, 8]]]})]:
        path = tmp_path / "task.yaml"
        path.write_text(yaml.safe_dump({**doc, "task": task}, sort_keys=False))
        config = load_config(path)
        assert config.task is not None and config.task.to_dict() == expected
        assert config.to_dict()["task"] == expected
        assert config.prune.max_drop == 1.0 and config.prune.targets == () and config.prune.pooling == "auto"


def test_run_with_a_task_and_a_search(tmp_path: Path) -> None:
    """3-vs-8 from the config: task head, other digits dropped from both datasets, the max_drop search as one more
    candidate with every tried budget in its report."""
    config = _config(tmp_path, task={"classes": [3, 8]}, prune={"methods": ["di"], "target_macs": [0.5],
                                                                "max_drop": 2.0},
                     gates={"max_top1_drop": 2})
    assert main(["-q", "run", str(config)]) == 0
    report = _report(tmp_path / "out")
    assert [c["name"] for c in report["candidates"]] == ["di-macs0.5", "di-within2pt"]
    data = report["data"]
    assert data["task"]["classes"] == [3, 8] and data["task"]["original_width"] == 10
    assert 0 < data["calibration"]["n"] < 128 and data["calibration"]["n"] + data["calibration"][
        "dropped_other_classes"] == 128
    assert 0 < data["evaluation"]["n"] < 400 and data["evaluation"]["n"] + data["evaluation"][
        "dropped_other_classes"] == 400
    best = onnx.load(str(tmp_path / "out" / "best.onnx"))
    assert best.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2  # one logit per task class
    searched = next(c for c in report["candidates"] if c["name"] == "di-within2pt")
    assert searched["top1_drop"] <= 0.02 + 1e-9
    cand = json.loads((tmp_path / "out" / f"{searched['path']}.report.json").read_text())
    assert cand["search"] and all({"target_macs", "macs_fraction", "top1", "within"} <= set(t) for t in cand["search"])
    assert searched["macs_fraction"] == pytest.approx(min(t["macs_fraction"] for t in cand["search"] if t["within"]),
                                                      abs=1e-6)


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is not installed (extra [ray]: make test-ray installs it)")
def test_run_on_ray_workers_equals_the_run_in_one_process(first_run: tuple[Path, int, str], tmp_path: Path) -> None:
    """``prune.workers: 2``: calibration and recovery shards on a local Ray; every candidate is the same model, to
    the last bit, as in the run without Ray (the same shards, merged in the same order)."""
    output, code, _ = first_run
    config = _config(tmp_path, prune={"workers": 2})
    assert main(["-q", "run", str(config)]) == code
    ours, theirs = _report(tmp_path / "out"), _report(output)
    for a, b in zip(ours["candidates"], theirs["candidates"], strict=True):
        assert a["name"] == b["name"] and a["top1"] == b["top1"] and a["macs"] == b["macs"]
        assert a["sha256"] == b["sha256"], a["name"]  # the candidate's model file, byte for byte
