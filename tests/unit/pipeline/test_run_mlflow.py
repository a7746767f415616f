"""``diprune run CONFIG --mlflow``: a parent run and one child run per candidate in a real local MLflow store.

MLflow is the optional ``[mlflow]`` extra (about 850 MB installed), not part of the default test install: without it
these tests are skipped with that reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.prune.demo import demo_model_path


def _config(folder: Path) -> Path:
    """Two data-free candidates (l2 at 0.5 and 0.35 of the MACs, no recovery): no calibration, seconds."""
    doc = {"model": str(demo_model_path()), "data": {"evaluation": {"path": "mnist", "limit": 200}},
           "prune": {"methods": ["l2"], "target_macs": [0.5, 0.35], "recover": "none"},
           "bench": {"batch": [1], "warmup": 0.02, "duration": 0.05, "iterations": 3, "rounds": 2},
           "gates": {"max_macs": 0.45}, "output": "out"}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_parent_and_child_runs_are_read_back_from_a_sqlite_store(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="MLflow is the optional [mlflow] extra (about 850 MB), not installed here")
    from mlflow.tracking import MlflowClient

    assert main(["-q", "run", str(_config(tmp_path)), "--mlflow"]) == 0
    output = tmp_path / "out"
    report = json.loads((output / "report.json").read_text())
    uri = f"sqlite:///{(output / 'mlflow.db').resolve()}"
    assert report["mlflow"]["uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(report["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["methods"] == "l2" and parent.data.tags["best"] == report["best"]
    assert parent.data.metrics["candidates"] == 2.0
    assert parent.data.metrics["original_top1"] == pytest.approx(report["original"]["top1"])
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "report.md", "best.onnx", "best.onnx.plan.json"} <= parent_files
    if "skipped" not in report["plots"]:
        assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} >= {
            "plots/accuracy_vs_macs.png", "plots/accuracy_vs_latency.png"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"l2-macs0.5", "l2-macs0.35"}
    for entry in report["candidates"]:
        child = by_name[entry["name"]]
        assert child.info.status == "FINISHED"
        assert child.data.params["method"] == "l2" and float(child.data.params["target"]) == entry["target"]["fraction"]
        assert child.data.metrics["macs_fraction"] == pytest.approx(entry["macs_fraction"])
        assert child.data.metrics["top1"] == pytest.approx(entry["top1"])
        assert child.data.metrics["speedup_b1"] == pytest.approx(entry["latency"][0]["speedup"])
        assert child.data.metrics["gate_max_macs"] == float(entry["passed"]["max_macs"])
        model_files = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
        assert f"model/{entry['name']}.onnx" in model_files and f"model/{entry['name']}.onnx.plan.json" in model_files
        local = Path(client.download_artifacts(child.info.run_id, f"model/{entry['name']}.onnx", str(tmp_path)))
        assert local.read_bytes() == (output / entry["path"]).read_bytes()


def test_without_mlflow_the_option_names_the_extra(tmp_path: Path) -> None:
    config = _config(tmp_path)
    code = ("import sys; sys.modules['mlflow'] = None; sys.modules['mlflow.tracking'] = None; "
            f"from pipeline.cli import main; sys.exit(main(['-q', 'run', {str(config)!r}, '--mlflow']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert "diprune[mlflow]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "report.json").exists()  # refused before the work


def test_an_unusable_store_fails_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mlflow", reason="MLflow is the optional [mlflow] extra (about 850 MB), not installed here")
    assert main(["-q", "run", str(_config(tmp_path)), "--mlflow", "nosuchscheme://store"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diprune: error: MLflow tracking store nosuchscheme://store is not usable")
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()
