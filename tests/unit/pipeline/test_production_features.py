"""Issue 10 at the pipeline level: input shapes for dynamic models, label-free data, grouped plans, pure JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.channels import analyze
from graph_ops.cost import count
from graph_ops.dynamic_dims import shapes_at
from pipeline.cli import main
from pipeline.errors import UserInputError
from pipeline.model.prepare import parse_input_shapes, prepare
from pipeline.prune.orchestrate import keep_lists, score
from pipeline.selection.allocate import select_channels
from pipeline.selection.plan import PruningPlan
from pipeline.selection.widths import block_order
from tests.graphs import tiny_classifier
from tests.graphs_refine import grouped_se_block

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.fixture
def dynamic_hw(tmp_path: Path) -> Path:
    """A classifier whose input height and width are symbolic (input ['N', 3, 'H', 'W'])."""
    return Path(tiny_classifier(str(tmp_path / "dyn.onnx"), in_channels=3, widths=(16, 16), classes=10, spatial=None))


def test_dynamic_hw_macs_budget_needs_input_shape(dynamic_hw: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    scores, plan = tmp_path / "scores.json", tmp_path / "plan.json"
    assert main(["-q", "score", "--model", str(dynamic_hw), "--method", "l2", "-o", str(scores)]) == 0
    budget = ["--target-macs", "0.5", "--round-to", "4", "--min-channels", "4", "--prune-ends"]
    assert main(["-q", "plan", str(scores), "--model", str(dynamic_hw), *budget, "-o", str(plan)]) == 1
    err = capsys.readouterr().err
    assert "--input-shape" in err and "dynamic spatial or token size" in err and len(err.strip().splitlines()) == 1
    shape = ["--input-shape", "input:1x3x12x12"]
    assert main(["-q", "plan", str(scores), "--model", str(dynamic_hw), *budget, *shape, "-o", str(plan)]) == 0
    made = PruningPlan.load(plan)
    assert made.meta["input_shapes"] == {"input": [1, 3, 12, 12]} and made.meta["reached"]
    out = tmp_path / "pruned.onnx"
    assert main(["-q", "apply", str(dynamic_hw), str(plan), "-o", str(out)]) == 0  # the plan's shapes are reused
    pruned = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]  # --input-shape is for analysis: the pruned model keeps its dynamic dims
    prepared = prepare(dynamic_hw, {"input": (1, 3, 12, 12)})
    achieved = count(pruned, shapes_at(pruned, {"input": (1, 3, 12, 12)})).macs / prepared.cost.macs
    assert achieved == pytest.approx(made.meta["macs_fraction"], rel=1e-12) and achieved <= 0.5
    assert main(["-q", "apply", str(dynamic_hw), str(plan), "-o", str(tmp_path / "b.onnx"),
                 "--input-shape", "input:1x3x16x16"]) == 1
    assert "same input shapes" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "message"), [("input:1x3xax8", "expected [NAME:]DIMS"), (":1x3x8x8", "[NAME:]DIMS"),
                                                 ("image:1x3x8x8", "has inputs ['input']"),
                                                 ("input:1x3x8", "rank 4")])
def test_bad_input_shapes_are_one_line_errors(spec: str, message: str, dynamic_hw: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(dynamic_hw), "--input-shape", spec]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("diprune: error:") and len(err.strip().splitlines()) == 1


def test_parse_input_shapes_refuses_repeats() -> None:
    assert parse_input_shapes(["a:1x2", "b:3"]) == {"a": (1, 2), "b": (3,)}
    with pytest.raises(UserInputError, match="twice"):
        parse_input_shapes(["a:1x2", "a:1x2"])


def _image_folder(root: Path, n: int, size: int = 8) -> Path:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
    return root


@pytest.mark.parametrize("method", ["mean-act", "apoz", "l2"])
def test_unlabelled_image_folder_prunes_with_label_free_methods_and_recovery(method: str, tmp_path: Path) -> None:
    model, _ = grouped_se_block()  # input x: [1, 3, 8, 8] (a static batch of 1: fed one image at a time)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    folder = _image_folder(tmp_path / "plain", 12)
    out = tmp_path / "pruned.onnx"
    assert main(["-q", "prune", str(path), "--data", str(folder), "--size", "8", "--crop", "8", "--method", method,
                 "--target-macs", "0.8", "--round-to", "4", "--min-channels", "4", "--recover", "lstsq",
                 "-o", str(out)]) == 0
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["recovery"]["method"] == "lstsq" and report["recovery"]["samples"] == 12
    assert report["macs_fraction"] <= 0.8


@pytest.mark.parametrize("method", ["di", "lda", "pls-vip"])
def test_label_aware_methods_refuse_unlabelled_data_with_labels_data(method: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model = Path(tiny_classifier(str(tmp_path / "m.onnx"), in_channels=1, widths=(16, 16), classes=10))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8))  # no 'y'
    assert main(["-q", "prune", str(model), "--data", str(data), "--method", method, "--target-params", "0.7",
                 "--labels", "data", "-o", str(tmp_path / "p.onnx")]) == 1
    err = capsys.readouterr().err
    assert "--labels data: the data" in err and "has no labels" in err and "--labels model" in err
    stats = tmp_path / "stats.npz"  # label-free statistics from the same data, then a label-aware scorer
    assert main(["-q", "calibrate", str(model), "--data", str(data), "-o", str(stats)]) == 0
    assert main(["-q", "score", str(stats), "--model", str(model), "--method", method,
                 "-o", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err
    assert "needs class labels" in err and "--labels model" in err and "l1, l2, random, mean-act, apoz" in err


def test_plans_of_grouped_convolutions_keep_equal_counts_per_block(tmp_path: Path) -> None:
    model, _ = grouped_se_block()
    path = tmp_path / "grouped.onnx"
    onnx.save(model, str(path))
    prepared = prepare(path)
    blocked = {g.id: g for g in prepared.index.groups if g.blocks > 1}
    others = [g.id for g in prepared.index.groups if g.id not in blocked]
    plan = select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.6, round_to=2,
                           min_channels=4, keep_first_and_last=False, protect=others)
    assert set(plan.keep) & set(blocked)
    for gid in set(plan.keep) & set(blocked):
        counts = np.bincount(np.asarray(plan.keep[gid]) // (blocked[gid].size // blocked[gid].blocks))
        assert len(set(counts.tolist())) == 1 and len(plan.keep[gid]) % 4 == 0
    from graph_ops.prune import apply_plan

    apply_plan(prepared.model, prepared.index, keep_lists(plan))  # a valid grouped conv (full checker)


def test_block_order_removes_evenly_and_keeps_a_fair_order_unchanged() -> None:
    order = np.array([5, 4, 7, 6, 0, 1, 2, 3])  # blocks of 4: {0..3}, {4..7}
    fair = block_order(order, 2)
    for r in range(1, 5):
        assert np.bincount(fair[:2 * r] // 4, minlength=2).tolist() == [r, r]
    assert fair[:2].tolist() == [5, 0]  # the first of each block to leave, in the original sequence
    assert block_order(fair, 2).tolist() == fair.tolist()


def test_inspect_json_is_pure_while_libraries_print_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(LIGHT / "light_bvlc_alexnet.onnx"), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["format"] == "diprune.inspect/1"
    assert "[W]" in captured.err  # onnx-graphsurgeon's warnings on this model went to stderr


def test_refined_groups_are_scored_per_producer_rows(tmp_path: Path) -> None:
    from tests.graphs_refine import c2f_block

    model, _ = c2f_block()
    path = tmp_path / "c2f.onnx"
    onnx.save(model, str(path))
    prepared = prepare(path)
    scores = score(prepared, None, "l2")
    weights = prepared.weights()
    cv1 = next(n for n in prepared.model.graph.node if n.op_type == "Conv")
    rows = np.sqrt((weights[cv1.input[1]].astype(np.float64) ** 2).reshape(8, -1).sum(axis=1))
    halves = [g.id for g in analyze(prepared.model).groups if g.id.startswith(cv1.output[0])]
    assert len(halves) == 2
    np.testing.assert_allclose(scores.scores[halves[0]], rows[:4])
    assert scores.scores[halves[1]].shape == (4,)


def test_di_elimination_is_block_fair_for_grouped_groups() -> None:
    from pipeline.calibration.stats import ProbeAccumulator
    from pipeline.selection.scorers.di import Eliminator, eliminate

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    features = rng.standard_normal((400, 8))
    features[:, :4] += 1.5 * labels[:, None]  # block 0 (channels 0..3) carries all the class information
    acc = ProbeAccumulator(8, 1, 2)
    acc.add(features, labels)
    stats = acc.freeze()
    free = eliminate([Eliminator(stats, np.arange(8).reshape(8, 1))])
    fair = eliminate([Eliminator(stats, np.arange(8).reshape(8, 1))], blocks=2)
    assert set(free.order[:4].tolist()) == {4, 5, 6, 7}  # unconstrained: the uninformative block goes first
    for r in range(1, 5):
        assert np.bincount(fair.order[:2 * r] // 4, minlength=2).tolist() == [r, r]
    assert fair.retention[4] < free.retention[4]  # the constraint costs information at half width
