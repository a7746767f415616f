"""The CLI end to end on tiny dense models: ``prune --labels model`` and with data labels (masks, YOLO files, text),
the step-by-step chain, the label choice recorded in statistics, scores, plans and reports, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graph_ops.io import load_model
from pipeline.calibration.stats import CalibrationStats
from pipeline.cli import main
from pipeline.errors import UserInputError
from pipeline.job.config import config_from_dict
from tests.dense_models import ctc_net, seg_net, yolo_net
from tests.oracles import assert_same_outputs

PRUNE = ["--target-macs", "0.6", "--round-to", "1", "--min-channels", "1", "--prune-ends"]


@pytest.fixture
def seg(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The segmentation net, unlabelled data and the same data with masks."""
    x = np.random.default_rng(0).standard_normal((24, 1, 16, 16)).astype(np.float32)
    y = np.zeros((24, 16, 16), np.int64)
    y[:, 4:12, 3:10] = 1
    y[::3, 0:4, :] = 2
    np.savez(tmp_path / "u.npz", x=x)
    np.savez(tmp_path / "l.npz", x=x, y=y)
    return Path(seg_net(str(tmp_path / "seg.onnx"))), tmp_path / "u.npz", tmp_path / "l.npz"


def _records(out: Path) -> tuple[dict, dict]:
    plan = json.loads(Path(f"{out}.plan.json").read_text())
    report = json.loads(Path(f"{out}.report.json").read_text())
    return plan["meta"]["labels"], report["calibration"]["targets"]


def test_prune_with_model_labels_by_default(seg: tuple[Path, Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model, unlabelled, _ = seg
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(model), "--data", str(unlabelled), *PRUNE, "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert "labels from the model per location (class maps) (the data has no labels)" in line
    plan_labels, targets = _records(out)
    assert plan_labels["labels"] == "model" and plan_labels["output_kind"] == "map"
    assert targets["views"] == {"r1": "grid", "r2": "grid"} and targets["reason"] == "the data has no labels"
    pruned = load_model(out)
    assert pruned.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3


def test_prune_with_data_masks_records_them(seg: tuple[Path, Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model, _, labelled = seg
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(model), "--data", str(labelled), "--method", "lda", *PRUNE, "-o", str(out)]) == 0
    assert "labels from the data per location (class maps)" in capsys.readouterr().out
    plan_labels, targets = _records(out)
    assert plan_labels["labels"] == "data" and targets["format"] == "npz" and "reason" not in targets


def test_calibrate_score_plan_chain_carries_the_labels(seg: tuple[Path, Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, unlabelled, _ = seg
    stats, scores, plan = tmp_path / "s.npz", tmp_path / "s.json", tmp_path / "p.json"
    assert main(["-q", "calibrate", str(model), "--data", str(unlabelled), "--labels", "model", "-o", str(stats)]) == 0
    assert "locations, labels from the model per location" in capsys.readouterr().out
    assert CalibrationStats.load(stats).targets["labels"] == "model"
    assert main(["-q", "score", str(stats), "--model", str(model), "--method", "pls-vip", "-o", str(scores)]) == 0
    assert json.loads(scores.read_text())["labels"]["kind"] == "map"
    assert main(["-q", "plan", str(scores), "--model", str(model), *PRUNE, "-o", str(plan)]) == 0
    assert json.loads(plan.read_text())["meta"]["labels"]["labels"] == "model"


def test_yolo_label_folder_and_model_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Path(yolo_net(str(tmp_path / "yolo.onnx")))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((12, 3, 32, 32)).astype(np.float32))
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(12):
        (labels / f"{i}.txt").write_text(f"{i % 2} 0.{3 + i % 5} 0.5 0.3 0.4\n")
    stats = tmp_path / "s.npz"
    assert main(["-q", "calibrate", str(model), "--data", str(tmp_path / "d.npz"), "--labels-path", str(labels),
                 "-o", str(stats)]) == 0
    targets = CalibrationStats.load(stats).targets
    assert (targets["labels"], targets["format"], targets["kind"], targets["num_classes"]) == ("data", "yolo",
                                                                                              "boxes", 3)
    assert main(["-q", "calibrate", str(model), "--data", str(tmp_path / "d.npz"), "--labels", "model",
                 "--conf-threshold", "0.3", "-o", str(stats)]) == 0
    targets = CalibrationStats.load(stats).targets
    assert targets["output_kind"] == "yolo" and targets["conf_threshold"] == 0.3


def test_ctc_text_labels_and_pruned_model_equal_the_mask_oracle(tmp_path: Path) -> None:
    model = Path(ctc_net(str(tmp_path / "ctc.onnx")))
    x = np.random.default_rng(2).standard_normal((16, 1, 8, 32)).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x, y=np.array([[1, 2, -1], [3, 4, 4], [2, -1, -1], [4, 1, 3]] * 4))
    out, masked = tmp_path / "p.onnx", tmp_path / "m.onnx"
    assert main(["-q", "prune", str(model), "--data", str(tmp_path / "t.npz"), "--label-format", "text",
                 "--recover", "none", *PRUNE, "-o", str(out)]) == 0
    plan_labels, targets = _records(out)
    assert plan_labels["kind"] == "sequence" and targets["format"] == "text" and targets["blank"] == 0
    assert main(["-q", "apply", str(model), f"{out}.plan.json", "--mask-only", "-o", str(masked)]) == 0
    assert_same_outputs(load_model(out), load_model(masked), {"input": x}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("extra", "message"), [
    (["--labels", "data"], "--labels data: the data .* has no labels"),
    (["--labels-path", "absent"], "labels path not found"),
    (["--output-kind", "yolo", "--labels", "model"], r"is not \[N, 4 \+ K, A\]"),
])
def test_label_mistakes_are_one_line_errors(seg: tuple[Path, Path, Path], tmp_path: Path, extra: list[str],
                                            message: str, capsys: pytest.CaptureFixture[str]) -> None:
    model, unlabelled, _ = seg
    code = main(["prune", str(model), "--data", str(unlabelled), *PRUNE, *extra, "-o", str(tmp_path / "p.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("diprune: error: ")
    assert __import__("re").search(message, err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)


def test_run_config_label_keys(tmp_path: Path) -> None:
    doc = {"model": "m.onnx", "data": {"calibration": {"path": "d.npz", "label_format": "yolo",
                                                       "labels_path": "labels"}, "evaluation": "e.npz"},
           "prune": {"methods": ["di"], "target_macs": [0.5], "labels": "model", "output_kind": "sequence",
                     "blank": 3, "locations_per_class": 4, "background_ratio": 2.0, "map_threshold": 0.4},
           "output": "out"}
    config = config_from_dict(doc, tmp_path)
    assert config.calibration.labels_path == str(tmp_path / "labels") and config.calibration.label_format == "yolo"
    options = config.prune.label_options()
    assert (options.source, options.output_kind, options.decode.blank, options.decode.map_threshold,
            options.sampling.per_class, options.sampling.background_ratio) == ("model", "sequence", 3, 0.4, 4, 2.0)
    for key, value, message in (("label", "model", "did you mean 'labels'"), ("labels", "human", "choose one of"),
                                ("conf_threshold", 1.0, r"must be in \(0, 1\)")):
        bad = {**doc, "prune": {**doc["prune"], key: value}}
        with pytest.raises(UserInputError, match=message):
            config_from_dict(bad, tmp_path)


@pytest.mark.slow  # two runs, each with its evaluation and latency rounds (~10 s alone)
def test_run_job_takes_the_models_labels_and_caches_the_calibration(tmp_path: Path) -> None:
    import yaml

    from pipeline.job.config import load_config
    from pipeline.job.run import run_config
    from tests.graphs import tiny_classifier

    model = tiny_classifier(str(tmp_path / "c.onnx"), in_channels=2, widths=(4, 6), classes=3, seed=7)
    np.savez(tmp_path / "u.npz", x=np.random.default_rng(6).standard_normal((40, 2, 8, 8)).astype(np.float32))
    doc = {"model": model, "data": {"calibration": "u.npz", "evaluation": "u.npz"},
           "prune": {"methods": ["di"], "target_macs": [0.6], "round_to": 1, "min_channels": 1, "prune_ends": True,
                     "pooling": "gap"},
           "bench": {"backend": "ort-cpu", "batch": [1], "warmup": 0.01, "duration": 0.05, "iterations": 2,
                     "rounds": 1},
           "output": "out"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    lines: list[str] = []
    report = run_config(load_config(tmp_path / "job.yaml"), progress=False, echo=lines.append)
    assert report.exit_code == 0 and report.cache["calibration"] == "computed"
    assert "calibration: labels from the model per image (the data has no labels)" in lines
    plan = json.loads((tmp_path / "out" / "candidates" / "di-macs0.6.onnx.plan.json").read_text())
    assert plan["meta"]["labels"]["labels"] == "model"
    doc["prune"]["target_macs"] = [0.7]  # another budget: the labelled calibration comes from the cache
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert run_config(load_config(tmp_path / "job.yaml"), progress=False).cache["calibration"] == "reused"
    doc["prune"]["labels"] = "data"  # another label choice: not the cached statistics (and no labels: refused)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserInputError, match="--labels data"):
        run_config(load_config(tmp_path / "job.yaml"), progress=False)


def test_prune_evaluates_against_a_separate_label_folder(seg: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``--eval-labels-path``: held-out images without labels in the file, masks in a folder (sample i <-> i.png);
    the report's metrics are against those masks, not against the original model's decisions."""
    from PIL import Image

    model, unlabelled, labelled = seg
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, mask in enumerate(np.load(labelled)["y"]):
        Image.fromarray(mask.astype(np.uint8)).save(masks / f"{i}.png")
    out, plain = tmp_path / "p.onnx", tmp_path / "q.onnx"
    common = ["-q", "prune", str(model), "--data", str(unlabelled), "--eval-data", str(unlabelled), *PRUNE]
    assert main([*common, "--eval-labels-path", str(masks), "-o", str(out)]) == 0
    assert main([*common, "-o", str(plain)]) == 0
    with_masks = json.loads(Path(f"{out}.report.json").read_text())["evaluation"]
    without = json.loads(Path(f"{plain}.report.json").read_text())["evaluation"]
    assert with_masks["pruned"]["metrics"]["against"] == "labels"
    assert without["pruned"]["metrics"]["against"] != "labels"
    assert with_masks["original"]["metrics"]["against"] == "labels"
