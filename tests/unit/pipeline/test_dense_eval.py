"""Dense metrics in ``evaluate`` / ``diprune eval`` / prune reports / gates, on tiny real ONNX models run by
onnxruntime: CTC sequences (CER, exact), segmentation maps (mIoU, pixel accuracy) and a YOLO-style head (mAP), against
labels (checked against brute force) and against a reference model."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.cli import main
from pipeline.data.datasets import from_npz
from pipeline.errors import UserInputError
from pipeline.evaluation.evaluate import evaluate, score
from pipeline.job.config import _gates
from pipeline.job.gates import check_gates, check_gates_fit_model, gate_value
from tests.dense_models import ctc_net, seg_net, yolo_net

HAS_EDIT = importlib.util.find_spec("editdistance") is not None
HAS_COCO = importlib.util.find_spec("pycocotools") is not None
needs_edit = pytest.mark.skipif(not HAS_EDIT, reason="editdistance (the [metrics] extra) is not installed")
needs_coco = pytest.mark.skipif(not HAS_COCO, reason="pycocotools (the [metrics] extra) is not installed")


def _outputs(model: str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _data(path: Path, x: np.ndarray, y: np.ndarray | None = None, **options) -> object:
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(path, **arrays)
    return from_npz(path, input_map={"x": "input"}, labels_key=None if y is None else "y", **options)


# ---------------------------------------------------------------------------------------------- brute force


def _collapse(path: list[int], blank: int = 0) -> list[int]:
    out, last = [], None
    for c in path:
        if c != last and c != blank:
            out.append(c)
        last = c
    return out


def _levenshtein(a: list[int], b: list[int]) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _ap50(dets: list[np.ndarray], gts: list[np.ndarray], cls: int) -> float:
    """COCO AP at IoU 0.5 of one class: greedy matching by score, 101-point interpolated precision."""
    rows = sorted(((d[4], i, d) for i, per in enumerate(dets) for d in per if d[5] == cls), key=lambda r: -r[0])
    used = {i: [False] * len(g) for i, g in enumerate(gts)}
    total = sum(int((g[:, 4] == cls).sum()) for g in gts)
    tp = []
    for _, i, d in rows:
        best, where = 0.5 - 1e-12, None
        for j, g in enumerate(gts[i]):
            if g[4] == cls and not used[i][j] and _iou(d, g) >= best:
                best, where = _iou(d, g), j
        if where is not None:
            used[i][where] = True
        tp.append(where is not None)
    hits = np.cumsum(tp)
    recall, precision = hits / total, hits / np.arange(1, len(tp) + 1)
    return float(np.mean([max((p for p, r in zip(precision, recall, strict=True) if r >= t), default=0.0)
                          for t in np.linspace(0, 1, 101)]))


# ---------------------------------------------------------------------------------------------- sequences


@needs_edit
def test_ctc_against_labels_matches_brute_force(tmp_path: Path) -> None:
    model = ctc_net(str(tmp_path / "ctc.onnx"))
    x = np.random.default_rng(0).random((12, 1, 8, 32), dtype=np.float32)
    decoded = [_collapse(list(row)) for row in _outputs(model, x).argmax(axis=2)]
    y = np.full((12, 6), -1, np.int64)
    rng = np.random.default_rng(1)
    for i in range(12):
        seq = decoded[i][:6] if i < 4 else list(rng.integers(1, 5, rng.integers(1, 6)))  # 4 rows exactly right
        y[i, :len(seq)] = seq
    report = evaluate(model, _data(tmp_path / "seq.npz", x, y), batch_size=5)
    truth = [[int(v) for v in row if v >= 0] for row in y]
    edits = sum(_levenshtein(p, t) for p, t in zip(decoded, truth, strict=True))
    exact = np.mean([p == t for p, t in zip(decoded, truth, strict=True)])
    m = report.metrics
    assert m["output_kind"] == "sequence" and m["against"] == "labels" and m["primary"] == "exact"
    assert m["cer"] == pytest.approx(edits / sum(map(len, truth)))
    assert m["exact"] == pytest.approx(exact) and m["score"] == m["exact"] and exact >= 4 / 12
    assert report.top1 is None and score(report.to_dict()) == ("exact", m["exact"])


@needs_edit
def test_ctc_against_itself_as_reference_is_exact(tmp_path: Path) -> None:
    model = ctc_net(str(tmp_path / "ctc.onnx"))
    other = ctc_net(str(tmp_path / "other.onnx"), seed=3)
    x = np.random.default_rng(0).random((9, 1, 8, 32), dtype=np.float32)
    data = _data(tmp_path / "seq.npz", x)
    same = evaluate(model, data, reference=model).metrics
    assert same["against"] == "reference" and same["exact"] == 1.0 and same["cer"] == 0.0
    differs = evaluate(other, data, reference=model).metrics  # another network: not the same sequences
    ref = [_collapse(list(r)) for r in _outputs(model, x).argmax(axis=2)]
    own = [_collapse(list(r)) for r in _outputs(other, x).argmax(axis=2)]
    assert differs["exact"] == pytest.approx(np.mean([a == b for a, b in zip(own, ref, strict=True)]))
    assert differs["exact"] < 1.0


def test_missing_metrics_extra_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ctc_net(str(tmp_path / "ctc.onnx"))
    data = _data(tmp_path / "seq.npz", np.zeros((2, 1, 8, 32), np.float32))
    monkeypatch.setitem(sys.modules, "editdistance", None)  # import editdistance -> ImportError
    with pytest.raises(UserInputError, match=r"pip install 'diprune\[metrics\]'"):
        evaluate(model, data, reference=model, output_kind="sequence")  # asked for: the metric or an error
    fidelity = evaluate(model, data, reference=model).to_dict()  # detected only: output fidelity, as without metrics
    assert "metrics" not in fidelity and fidelity["outputs"]
    assert all(row["max_abs_diff"] == 0.0 for row in fidelity["outputs"].values())


# ---------------------------------------------------------------------------------------------- maps


def test_segmentation_against_masks_matches_brute_force(tmp_path: Path) -> None:
    model = seg_net(str(tmp_path / "seg.onnx"), classes=3)
    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 16, 16), dtype=np.float32)
    pred = _outputs(model, x).argmax(axis=1)
    y = np.where(rng.random((5, 8, 8)) < 0.6, pred, rng.integers(0, 3, (5, 8, 8)))
    y[:, 0, :] = 255  # ignored
    report = evaluate(model, _data(tmp_path / "seg.npz", x, y), batch_size=2)
    ious = []
    for c in range(3):
        valid = y != 255
        inter = np.sum((pred == c) & (y == c) & valid)
        union = np.sum(((pred == c) | (y == c)) & valid)
        if union:
            ious.append(inter / union)
    m = report.metrics
    assert m["against"] == "labels" and m["primary"] == "miou"
    assert m["miou"] == pytest.approx(np.mean(ious)) and 0.3 < m["miou"] < 1.0
    assert m["pixel_accuracy"] == pytest.approx(np.mean(pred[y != 255] == y[y != 255]))
    assert m["pixels"] == int(np.sum(y != 255))


def test_segmentation_against_reference_and_a_probability_map(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)
    data = _data(tmp_path / "seg.npz", x)
    for classes in (3, 1):
        model = seg_net(str(tmp_path / f"seg{classes}.onnx"), classes=classes)
        m = evaluate(model, data, reference=model).metrics
        assert (m["miou"], m["pixel_accuracy"], m["against"]) == (1.0, 1.0, "reference")
    other = seg_net(str(tmp_path / "other.onnx"), classes=3, seed=5)
    a, b = (_outputs(str(tmp_path / n), x).argmax(axis=1) for n in ("other.onnx", "seg3.onnx"))
    assert evaluate(other, data, reference=str(tmp_path / "seg3.onnx")).metrics["pixel_accuracy"] == \
        pytest.approx(np.mean(a == b))


def test_dense_model_without_labels_or_reference_and_mismatched_labels(tmp_path: Path) -> None:
    model = seg_net(str(tmp_path / "seg.onnx"))
    x = np.zeros((2, 1, 16, 16), np.float32)
    with pytest.raises(UserInputError, match="--reference"):
        evaluate(model, _data(tmp_path / "a.npz", x))
    with pytest.raises(UserInputError, match="labels are sequence"):
        evaluate(model, _data(tmp_path / "b.npz", x, np.ones((2, 3), np.int64)))


def test_label_maps_at_another_size_are_scored_at_their_own_size(tmp_path: Path) -> None:
    """Masks at the input's 16 x 16 for an 8 x 8 output: the predicted map is resampled to each mask (nearest pixel
    centre), so the model scored against its own upsampled decisions gets mIoU 1, and a mask that differs in one
    input pixel costs exactly that pixel."""
    from pipeline.evaluation.dense_eval import resample_classes

    assert resample_classes(np.array([[0, 1], [2, 3]]), (4, 4)).tolist() == \
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert resample_classes(np.arange(16).reshape(4, 4), (2, 2)).tolist() == [[5, 7], [13, 15]]
    with pytest.raises(UserInputError, match="2-D"):
        resample_classes(np.zeros((2, 2), np.int64), (2, 2, 2))
    model = seg_net(str(tmp_path / "seg.onnx"))
    x = np.random.default_rng(1).random((2, 1, 16, 16), dtype=np.float32)
    own = _outputs(str(tmp_path / "seg.onnx"), x).argmax(axis=1)
    assert own.shape == (2, 8, 8)
    masks = np.stack([resample_classes(m, (16, 16)) for m in own])
    m = evaluate(model, _data(tmp_path / "up.npz", x, masks)).metrics
    assert (m["against"], m["pixel_accuracy"], m["miou"]) == ("labels", 1.0, 1.0)
    masks[0, 0, 0] = (masks[0, 0, 0] + 1) % 3
    m = evaluate(model, _data(tmp_path / "off.npz", x, masks)).metrics
    assert m["pixel_accuracy"] == pytest.approx(1 - 1 / masks.size)


def test_classifier_unchanged_and_output_kind_checked() -> None:
    from pipeline.data.named import open_dataset
    from pipeline.prune.demo import demo_model_path

    data = open_dataset("mnist", split="test", limit=32)
    report = evaluate(demo_model_path(), data)
    assert report.metrics is None and "metrics" not in report.to_dict() and report.top1 is not None
    assert score(report.to_dict()) == ("top1", report.top1)
    with pytest.raises(UserInputError, match="only the 'classes' kind"):
        evaluate(demo_model_path(), data, output_kind="map")


# ---------------------------------------------------------------------------------------------- detection


@needs_coco
def test_yolo_against_labels_matches_brute_force_and_itself(tmp_path: Path) -> None:
    model = yolo_net(str(tmp_path / "yolo.onnx"), classes=2)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    from pipeline.data.outputs import DecodeOptions, yolo_decode

    found = yolo_decode(_outputs(model, x), DecodeOptions(conf=0.001))
    labels = tmp_path / "labels"
    labels.mkdir()
    gts = []
    for i, det in enumerate(found):  # ground truth: two of its detections (one moved), plus a box it misses
        rows = [det[0, [0, 1, 2, 3, 5]], det[min(3, len(det) - 1), [0, 1, 2, 3, 5]] + [3, 2, 3, 2, 0],
                np.array([1.0, 1.0, 9.0, 7.0, float(i % 2)])]
        g = np.clip(np.array(rows), 0, 32)
        gts.append(g)
        (labels / f"{i}.txt").write_text("".join(
            f"{int(r[4])} {(r[0] + r[2]) / 64} {(r[1] + r[3]) / 64} {(r[2] - r[0]) / 32} {(r[3] - r[1]) / 32}\n"
            for r in g))
    np.savez(tmp_path / "det.npz", x=x)
    data = from_npz(tmp_path / "det.npz", input_map={"x": "input"}, labels_path=labels)
    m = evaluate(model, data).metrics
    present = sorted({int(c) for g in gts for c in g[:, 4]})
    assert m["against"] == "labels" and m["primary"] == "map50" and m["images"] == 3
    assert m["map50"] == pytest.approx(np.mean([_ap50(found, gts, c) for c in present]), abs=1e-6)
    assert 0.0 < m["map50"] < 1.0 and m["map50_95"] <= m["map50"]
    same = evaluate(model, _data(tmp_path / "plain.npz", x), reference=model).metrics
    assert (same["map50"], same["map50_95"], same["against"]) == (pytest.approx(1.0), pytest.approx(1.0),
                                                                   "reference")


# ---------------------------------------------------------------------------------------------- gates, CLI, reports


def test_dense_gates_read_changes_in_points() -> None:
    candidate = {"metric_changes": {"miou": -0.012, "exact": -0.03, "cer": 0.004, "map50": 0.0}}
    assert gate_value("max_miou_drop", candidate) == pytest.approx(1.2)
    assert gate_value("max_cer_increase", candidate) == pytest.approx(0.4)
    assert check_gates({"max_miou_drop": 1.5, "max_exact_drop": 2.0, "max_cer_increase": 0.5, "max_map50_drop": 0},
                       candidate) == {"max_miou_drop": True, "max_exact_drop": False, "max_cer_increase": True,
                                      "max_map50_drop": True}
    assert check_gates({"max_map50_95_drop": 5}, candidate) == {"max_map50_95_drop": False}  # not measured
    assert check_gates({"max_miou_drop": 1}, {}) == {"max_miou_drop": False}


def test_dense_gates_are_validated_and_fit_the_model() -> None:
    assert _gates({"max_miou_drop": 2}) == {"max_miou_drop": 2.0}
    with pytest.raises(UserInputError, match="in points"):
        _gates({"max_exact_drop": 0.02})
    with pytest.raises(UserInputError, match="max_cer_increase"):
        _gates({"max_cer_increase": 150})
    check_gates_fit_model({"max_miou_drop": 1, "max_top1_drop": 1}, "map")
    with pytest.raises(UserInputError, match=r"'max_miou_drop' limits a metric of 'map' outputs.*class scores"):
        check_gates_fit_model({"max_miou_drop": 1}, None)
    with pytest.raises(UserInputError, match="max_exact_drop, max_cer_increase"):
        check_gates_fit_model({"max_map50_drop": 1}, "sequence")


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_cli_eval_json_shows_dense_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = seg_net(str(tmp_path / "seg.onnx"), classes=3)
    x = np.random.default_rng(0).random((6, 1, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "seg.npz", x=x, y=_outputs(model, x).argmax(axis=1))
    code, text = _cli(["-q", "eval", model, "--data", str(tmp_path / "seg.npz"), "--input-key", "x"])
    doc = json.loads(text)
    assert code == 0 and doc["metrics"]["miou"] == 1.0 and doc["metrics"]["against"] == "labels"
    np.savez(tmp_path / "plain.npz", x=x)
    code, text = _cli(["-q", "eval", model, "--data", str(tmp_path / "plain.npz"), "--reference", model,
                       "--map-threshold", "0.3"])
    assert code == 0 and json.loads(text)["metrics"]["against"] == "reference"
    code = main(["-q", "eval", model, "--data", str(tmp_path / "plain.npz")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("diprune: error:") and "--reference" in err and "\n" not in err


@needs_edit
def test_cli_eval_missing_extra_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = ctc_net(str(tmp_path / "ctc.onnx"))
    np.savez(tmp_path / "seq.npz", x=np.zeros((2, 1, 8, 32), np.float32), y=np.ones((2, 3), np.int64))
    monkeypatch.setitem(sys.modules, "editdistance", None)
    code = main(["-q", "eval", model, "--data", str(tmp_path / "seq.npz"), "--input-key", "x"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("diprune: error:") and "pip install 'diprune[metrics]'" in err


@pytest.mark.slow  # a prune and a --max-drop search, about a second
def test_prune_report_and_max_drop_use_the_dense_metric(tmp_path: Path) -> None:
    from pipeline.prune.one_shot import prune

    model = seg_net(str(tmp_path / "seg.onnx"), classes=3)
    x = np.random.default_rng(0).random((48, 1, 16, 16), dtype=np.float32)
    data = _data(tmp_path / "plain.npz", x)
    report = prune(model, tmp_path / "out.onnx", data=data, method="l2", target_macs=0.6, min_channels=1,
                   round_to=1, eval_data=data, progress=False, recover="none").to_dict()
    original, pruned = report["evaluation"]["original"]["metrics"], report["evaluation"]["pruned"]["metrics"]
    assert original["against"] == pruned["against"] == "reference" and original["miou"] == 1.0
    assert 0.0 <= pruned["miou"] <= 1.0
    searched = prune(model, tmp_path / "s.onnx", data=data, method="l2", min_channels=1, round_to=1, eval_data=data,
                     progress=False, recover="none", max_drop=100).to_dict()
    assert searched["search"][0]["within"] and "miou" in searched["search"][0]
    onnx.checker.check_model(onnx.load(tmp_path / "s.onnx"), full_check=True)


def _job(folder: Path, model: str, data: Path, gates: dict) -> Path:
    import yaml

    doc = {"model": model, "data": {"calibration": {"path": str(data), "input_key": ["x"]},
                                    "evaluation": {"path": str(data), "input_key": ["x"]}},
           "prune": {"methods": ["l2"], "target_macs": [0.6], "recover": "none", "min_channels": 1, "round_to": 1},
           "bench": {"backend": "ort-cpu", "batch": [1], "warmup": 0.0, "duration": 0.02, "iterations": 2,
                     "rounds": 1},
           "gates": gates, "output": str(folder / "out")}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow  # three small runs, a few seconds
def test_run_report_and_gates_on_a_segmentation_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = seg_net(str(tmp_path / "seg.onnx"), classes=3)
    x = np.random.default_rng(0).random((32, 1, 16, 16), dtype=np.float32)
    np.savez(tmp_path / "plain.npz", x=x)
    code = main(["-q", "run", str(_job(tmp_path, model, tmp_path / "plain.npz", {"max_miou_drop": 100}))])
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    cand = doc["candidates"][0]
    assert code == 0 and doc["original"]["metrics"]["miou"] == 1.0
    assert cand["metrics"]["against"] == "reference" and cand["passed"] == {"max_miou_drop": True}
    assert cand["metric_changes"]["miou"] == pytest.approx(cand["metrics"]["miou"] - 1.0)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Dense metrics" in markdown and f"miou {100 * cand['metrics']['miou']:.2f} %" in markdown
    drop = -100 * cand["metric_changes"]["miou"]
    assert drop > 0.2  # pruning 40 % of a random network's MACs without recovery changes its maps
    code = main(["-q", "run", str(_job(tmp_path, model, tmp_path / "plain.npz", {"max_miou_drop": drop - 0.1}))])
    again = json.loads((tmp_path / "out" / "report.json").read_text())  # a gate just under the drop fails
    assert code == 3 and again["candidates"][0]["passed"] == {"max_miou_drop": False}
    capsys.readouterr()
    code = main(["-q", "run", str(_job(tmp_path, model, tmp_path / "plain.npz", {"max_exact_drop": 1}))])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "'max_exact_drop' limits a metric of 'sequence' outputs" in err


def test_dense_labels_for_a_classifier_are_refused_in_eval_and_prune(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.prune.demo import demo_model_path

    x = np.random.default_rng(0).integers(0, 255, (20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros((20, 2), np.int64))  # (N, L): read as sequences
    for command in (["eval", str(demo_model_path()), "--data", str(tmp_path / "d.npz")],
                    ["prune", str(demo_model_path()), "--data", str(tmp_path / "d.npz"), "--method", "l2",
                     "--target-macs", "0.5", "-o", str(tmp_path / "p.onnx")]):
        assert main(["-q", *command]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("diprune: error:") and "one class id per sample" in err and "\n" not in err
    assert not list(tmp_path.glob("p.onnx*"))
