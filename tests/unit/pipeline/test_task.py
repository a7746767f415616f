"""Task-dependent pruning as a product feature: task heads, task data, the statistics and the --max-drop search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_ops.errors import UserInputError
from graph_ops.prune import apply_plan
from graph_ops.task_head import group_classes, model_task, restrict_classes
from pipeline.calibration.calibrate import calibrate
from pipeline.cli import main
from pipeline.data.datasets import from_iterable
from pipeline.data.named import open_dataset
from pipeline.data.task import Task, load_task_map, parse_classes
from pipeline.evaluation.evaluate import evaluate
from pipeline.model.prepare import prepare
from pipeline.prune.demo import demo_model_path
from pipeline.prune.one_shot import prune
from tests.oracles import run_ort

MNIST_X = next(open_dataset("mnist", split="test", limit=300).batches(300))[0]


def _head_model(softmax: bool) -> onnx.ModelProto:
    """x[N,6] -> MatMul + Add (bias) -> logits[N,10] (optionally through Softmax): the non-Gemm head forms."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 10)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["logits" if not softmax else "z"], name="add")]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], name="softmax", axis=1))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_ort(model, {model.graph.input[0].name: x})[0]


@pytest.mark.parametrize("form", ["gemm", "matmul-add", "softmax"])
def test_restricted_head_equals_slicing_the_original_outputs(form: str) -> None:
    if form == "gemm":
        model, x = onnx.load(str(demo_model_path())), next(iter(MNIST_X.values()))
    else:
        model, x = _head_model(form == "softmax"), np.random.default_rng(1).standard_normal((20, 6)).astype(np.float32)
    classes = [8, 3, 5]
    restricted = restrict_classes(model, classes)
    onnx.checker.check_model(restricted, full_check=True)
    want = _outputs(model, x)[:, classes]
    np.testing.assert_allclose(_outputs(restricted, x), want, rtol=1e-6, atol=1e-6)
    ops = [n.op_type for n in restricted.graph.node]
    assert ("Gather" in ops) == (form == "softmax")  # dense heads are sliced, a softmax output is gathered
    assert model_task(restricted)["classes"] == classes and model_task(model) is None


@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "probabilities"])
def test_grouped_head_equals_the_documented_formula(softmax: bool) -> None:
    model = _head_model(softmax)
    x = np.random.default_rng(2).standard_normal((15, 6)).astype(np.float32)
    groups = {"low": [0, 1, 2], "odd": [3, 5, 7, 9], "rest": [4, 6]}
    grouped = group_classes(model, groups)
    onnx.checker.check_model(grouped, full_check=True)
    full = _outputs(model, x).astype(np.float64)
    if softmax:  # probabilities: the group's probability is the sum of its members'
        want = np.stack([full[:, g].sum(axis=1) for g in groups.values()], axis=1)
    else:  # logits: log-sum-exp, so that softmax over groups = summed member probabilities
        want = np.stack([np.log(np.exp(full[:, g]).sum(axis=1)) for g in groups.values()], axis=1)
    got = _outputs(grouped, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if not softmax:  # the groups' softmax is the members' probability mass (renormalised over the grouped classes)
        covered = [c for g in groups.values() for c in g]
        probs = np.exp(full[:, covered]) / np.exp(full[:, covered]).sum(axis=1, keepdims=True)
        group_probs = np.exp(got) / np.exp(got).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(group_probs[:, 1], probs[:, 3:7].sum(axis=1), rtol=1e-5)


def test_bad_tasks_are_user_errors(tmp_path: Path) -> None:
    model = _head_model(False)
    with pytest.raises(UserInputError, match=r"must lie in 0\.\.9"):
        restrict_classes(model, [3, 12])
    with pytest.raises(UserInputError, match="listed twice"):
        restrict_classes(model, [3, 3])
    with pytest.raises(UserInputError, match="already has a task head"):
        restrict_classes(restrict_classes(model, [1, 2]), [1, 2])
    with pytest.raises(UserInputError, match="two groups"):
        group_classes(model, {"only": [1, 2]})
    with pytest.raises(UserInputError, match="at least two classes"):
        parse_classes("3")
    (tmp_path / "bad.json").write_text('{"a": [1, 2], "b": [2, 3]}')
    with pytest.raises(UserInputError, match="appears twice"):
        load_task_map(tmp_path / "bad.json")
    unlabelled = from_iterable([(np.zeros((4, 1, 28, 28), np.float32), None)])
    with pytest.raises(UserInputError, match="has no labels"):
        Task(classes=(3, 8)).dataset(unlabelled)


def test_labels_of_other_classes_never_reach_the_statistics() -> None:
    data = open_dataset("mnist", split="train", limit=600)
    labels = np.asarray(data.labels)
    task = Task(classes=(8, 3))
    prepared = prepare(demo_model_path(), task=task)
    restricted = task.dataset(data)
    assert restricted.dropped == int((~np.isin(labels, [3, 8])).sum()) and restricted.total == 600
    stats = calibrate(prepared, restricted.data, progress=False)
    assert stats.num_classes == 2 and stats.task == {"classes": [8, 3]}
    for probe in stats.probes.values():  # task class 0 is digit 8, task class 1 digit 3
        assert probe.class_counts.tolist() == [int((labels == 8).sum()), int((labels == 3).sum())]
    rows = np.flatnonzero(np.isin(labels, [3, 8]))  # the same samples given directly give the same statistics
    x = data.loader(rows)[data.keys[0]]
    direct = calibrate(prepared, from_iterable([(x, np.where(labels[rows] == 8, 0, 1))]), progress=False)
    for name, probe in stats.probes.items():
        np.testing.assert_array_equal(probe.gram, direct.probes[name].gram)
        np.testing.assert_array_equal(probe.class_sums, direct.probes[name].class_sums)


def test_max_drop_returns_a_model_within_the_bound_and_reports_the_search(tmp_path: Path) -> None:
    out = tmp_path / "task.onnx"
    evaluation = open_dataset("mnist", split="test", limit=400)
    report = prune(demo_model_path(), out, data=open_dataset("mnist", split="train", limit=600), method="di",
                   eval_data=evaluation, task=Task(classes=(3, 8)), max_drop=1.0, progress=False)
    assert report.search and all(set(s) >= {"target_macs", "macs_fraction", "top1", "within"} for s in report.search)
    within = [s for s in report.search if s["within"]]
    assert within and report.macs_fraction == pytest.approx(min(s["macs_fraction"] for s in within), abs=1e-6)
    original = report.evaluation["original"]["top1"]
    measured = evaluate(out, evaluation, task=Task(classes=(3, 8))).top1  # the written model, measured again
    assert measured == pytest.approx(report.evaluation["pruned"]["top1"])
    assert measured >= original - 0.01
    saved = json.loads(Path(f"{out}.report.json").read_text())
    assert saved["task"]["classes"] == [3, 8] and saved["task"]["original_width"] == 10
    assert len(saved["search"]) == len(report.search)
    assert [d.dim_value for d in onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim][1:] == [2]
    assert saved["budget"]["max_drop"] == 1.0 and "within 1 point" in report.summary()
    if report.search[0]["within"]:  # the floor was within the bound: said so, not "budget not reached"
        assert saved["budget"]["target_macs"] is None and "NOT reached" not in report.summary()
        assert any("smallest reachable model" in n for n in saved["notes"])


def test_the_cli_stages_carry_the_task_from_file_to_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """calibrate -> score -> plan -> apply with --task-map only at calibration: every later stage reads the task
    from the file it gets and rebuilds the same head; the result equals a one-shot prune with the same plan."""
    model = str(demo_model_path())
    task_map = tmp_path / "map.json"
    task_map.write_text(json.dumps({"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6, 8]}))
    stats, scores, plan, out = (str(tmp_path / n) for n in ("s.npz", "s.json", "p.json", "o.onnx"))
    assert main(["-q", "calibrate", model, "--data", "mnist", "--limit", "300", "--task-map", str(task_map),
                 "-o", stats]) == 0
    assert main(["-q", "score", stats, "--model", model, "--method", "di", "-o", scores]) == 0
    assert main(["-q", "plan", scores, "--target-macs", "0.4", "-o", plan]) == 0
    assert json.loads(Path(plan).read_text())["meta"]["task"] == {"groups": [["odd", [1, 3, 5, 7, 9]],
                                                                              ["even", [0, 2, 4, 6, 8]]]}
    assert main(["-q", "apply", model, plan, "-o", out]) == 0
    prepared = prepare(model, task=load_task_map(task_map))
    keep = {g: v["keep"] for g, v in json.loads(Path(plan).read_text())["groups"].items()}
    x = next(iter(MNIST_X.values()))
    np.testing.assert_allclose(_outputs(onnx.load(out), x),
                               _outputs(apply_plan(prepared.model, prepared.index, keep), x), rtol=1e-6, atol=1e-6)
    capsys.readouterr()
    assert main(["eval", out, "--data", "mnist", "--limit", "200", "--task-map", str(task_map)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"]["names"] == ["odd", "even"] and doc["n"] == 200 and doc["top1"] is not None
