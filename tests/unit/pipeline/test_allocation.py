"""Allocation by measurement (pipeline.selection.sensitivity, the measured planner) and progressive pruning (pipeline.selection.progressive)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from graph_ops.cost import count
from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from pipeline.cli import main
from pipeline.data.named import open_dataset
from pipeline.errors import UserInputError
from pipeline.model.runtime import make_session
from pipeline.prune.demo import demo_model_path
from pipeline.prune.orchestrate import PruneRun
from pipeline.selection.allocate import FLOOR_SHARE, select_channels
from pipeline.selection.progressive import compose, progressive, round_targets
from pipeline.selection.sensitivity import MIN_SAMPLES, STRETCH, Sensitivity, _kl, _probabilities
from pipeline.selection.widths import anchor_widths, block_order, measured_curve
from tests.unit.pipeline.test_plan import SIZES, _index, _scores


def _sensitivity(damage: dict[str, float], collapse: float = 1.0) -> Sensitivity:
    """Damage ``d`` at every anchor of a group: linear in the channels removed, ``d`` when all but 8 are gone."""
    widths = {g: anchor_widths(s, 8, 8) for g, s in SIZES.items() if g != "g5"}
    return Sensitivity(metric="kl", collapse=collapse, widths=widths,
                       damage={g: tuple(damage[g] * (SIZES[g] - w) / (SIZES[g] - 8) for w in ws)
                               for g, ws in widths.items()},
                       samples=64, passes=1, seconds=0.0, sizes={g: s for g, s in SIZES.items() if g != "g5"})


def test_anchor_widths_are_ladder_rungs_down_to_the_floor() -> None:
    assert anchor_widths(64, 8, 8) == (48, 32, 16, 8)
    assert anchor_widths(60, 8, 8) == (48, 32, 16, 8)
    assert anchor_widths(8, 8, 8) == ()  # at its floor already
    assert anchor_widths(8, 8, 4) == (4,)  # only the finer step (round_to / 2) goes below a one-rung group
    assert all(w % 4 == 0 for w in anchor_widths(32, 8, 8, blocks=4))


def test_measured_curve_goes_through_the_points_and_follows_the_criterion_between_them() -> None:
    criterion = np.linspace(1.0, 0.0, 33) ** 2  # width 0 .. 32: lost share, 0 at full width
    curve = measured_curve(criterion, (24, 16, 8), (0.1, 0.3, 0.9), collapse=0.0)
    assert curve[32] == 0.0
    assert np.allclose(curve[[24, 16, 8]], [0.1, 0.3, 0.9])
    assert np.all(np.diff(curve) <= 1e-15)  # non-decreasing as the width falls
    t = (criterion[20] - criterion[24]) / (criterion[16] - criterion[24])
    assert curve[20] == pytest.approx(0.1 + t * 0.2)
    assert curve[4] == pytest.approx(0.9 + 4 * (0.9 - 0.3) / 8)  # below the last point: its slope per channel


def test_measured_allocation_spares_the_sensitive_group_and_measures_the_ends() -> None:
    index, scores = _index(), _scores(1, retention=False)
    calm = {"g1": 0.0001, "g2": 0.05, "g3": 0.05, "g4": 0.05}
    plan = select_channels(scores, index, target_macs=0.5, keep_first_and_last=False,
                           sensitivity=_sensitivity(calm))
    assert "g1" in plan.keep  # the first layer is pruned: its measured damage is small
    touchy = select_channels(scores, index, target_macs=0.5, keep_first_and_last=False,
                             sensitivity=_sensitivity({**calm, "g1": 0.4}))
    assert "g1" not in touchy.keep and touchy.meta["reached"]
    record = touchy.meta["allocation"]
    assert record["mode"] == "measured" and record["ends"]["g1"]["why"] == "first layer"
    assert record["ends"]["g1"]["kept"] == SIZES["g1"] and record["ends"]["g4"]["why"] == "classifier input"
    assert record["groups"]["g1"]["damage"][-1] == pytest.approx(0.4)


def test_measured_floors_hold_unless_the_budget_needs_them() -> None:
    index, scores = _index(), _scores(2, retention=True)
    damage = {"g1": 0.2, "g2": 0.2, "g3": 0.2, "g4": 4.0}  # g4 collapses below about 3/4 of its width
    plan = select_channels(scores, index, target_macs=0.6, keep_first_and_last=False,
                           sensitivity=_sensitivity(damage))
    floor = plan.meta["allocation"]["floors"]["g4"]
    assert len(plan.keep.get("g4", range(64))) >= floor and not plan.meta["allocation"]["floors_relaxed"]
    assert 4.0 * (64 - floor) / 56 <= FLOOR_SHARE
    tight = select_channels(scores, index, target_macs=0.08, keep_first_and_last=False,
                            sensitivity=_sensitivity(damage))
    assert tight.meta["allocation"]["floors_relaxed"] and len(tight.keep["g4"]) < floor


def test_without_a_measurement_the_plan_is_the_rule_plan() -> None:
    index, scores = _index(), _scores(3, retention=True)
    plan = select_channels(scores, index, target_macs=0.5)
    assert "allocation" not in plan.meta and "g1" not in plan.keep and "g4" not in plan.keep


def test_kl_of_probabilities_and_logits() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert _probabilities(probs) is not None and np.allclose(_probabilities(probs), probs)
    logits = np.log(probs) + 3.0
    assert np.allclose(_probabilities(logits), probs)
    assert _kl(probs, probs) == 0.0 and _kl(probs, probs[::-1]) > 0


@pytest.fixture(scope="module")
def mnist_run() -> PruneRun:
    return PruneRun(demo_model_path(), open_dataset("mnist", split="train", limit=1024), progress=False,
                    backend="ort-cpu", intra_op_threads=1)


@pytest.mark.slow
def test_sensitivity_of_the_demo_cnn_is_the_masked_models_kl(mnist_run: PruneRun) -> None:
    scores = mnist_run.scores("l2")
    sens = mnist_run.sensitivity(scores)
    assert sens is mnist_run.sensitivity(scores)  # measured once per setting
    prunable = [g for g in mnist_run.prepared.index.groups if g.prunable]
    assert set(sens.widths) == {g.id for g in prunable}
    assert sens.passes == 1 + sum(len(w) for w in sens.widths.values()) and sens.samples == 64
    assert sens.collapse > 1.0  # ten confident classes: far from the mean prediction
    group = prunable[1]
    width = sens.widths[group.id][1]
    keep = {group.id: tuple(sorted(block_order(scores.elimination_order(group.id), 1)[group.size - width:]))}
    feeds = {mnist_run.prepared.model.graph.input[0].name: mnist_run.data.take(0, 64)[0]["x"]}
    original, _ = make_session(mnist_run.prepared.model.SerializeToString())
    masked, _ = make_session(zero_channels(mnist_run.prepared.model, mnist_run.prepared.index, keep).SerializeToString())
    expected = _kl(_probabilities(original.run(None, feeds)[0]), _probabilities(masked.run(None, feeds)[0]))
    assert max(sens.damage[group.id][:2]) >= expected - 1e-9  # running maximum over the anchors
    assert sens.damage[group.id][1] == pytest.approx(max(expected, sens.damage[group.id][0]), rel=1e-6)
    for values in sens.damage.values():
        assert list(values) == sorted(values)


@pytest.mark.parametrize("limit", [200, 40])
def test_the_measurement_stays_within_one_pass_over_the_calibration_data(limit: int) -> None:
    run = PruneRun(demo_model_path(), open_dataset("mnist", split="train", limit=limit), progress=False,
                   backend="ort-cpu", intra_op_threads=1)
    scores = run.scores("l2")
    plan = run.plan(scores, target_macs=0.5)
    record = plan.meta["allocation"]
    if limit == 40:  # 6 groups x 2 widths + 1 at 16 samples = 208 > 40: the rule, and why
        assert record["mode"] == "rule" and "cost cap" in record["why"]
        assert run.sensitivity(scores) is None
        return
    sens = run.sensitivity(scores)
    assert record["mode"] == "measured" and sens.passes * sens.samples <= limit
    assert all(len(w) <= 2 for w in sens.widths.values()) and sens.samples >= 16


def test_small_data_stretches_the_measurement_to_two_passes_before_falling_back_to_the_rule() -> None:
    """6 groups x 2 widths + 1 passes at 16 samples = 208 sample-inferences: 120 samples cannot afford them in one
    pass, but can in two (STRETCH): measured, on as many samples as two passes allow."""
    run = PruneRun(demo_model_path(), open_dataset("mnist", split="train", limit=120), progress=False,
                   backend="ort-cpu", intra_op_threads=1)
    scores = run.scores("l2")
    assert run.plan(scores, target_macs=0.5).meta["allocation"]["mode"] == "measured"
    sens = run.sensitivity(scores)
    assert 120 < sens.passes * sens.samples <= STRETCH * 120 and sens.samples >= MIN_SAMPLES


def test_round_targets_and_compose() -> None:
    assert round_targets(0.25, 2) == [0.5, 0.25]
    assert round_targets(None, 3) == [None, None, None]
    assert compose({"a": (1, 3, 5, 7)}, {"a": 8, "b": 4}, {"a": (0, 2), "b": (3,)}) == {"a": (1, 5), "b": (3,)}
    with pytest.raises(UserInputError, match="not a group"):
        compose({}, {"a": 8}, {"c": (0,)})


@pytest.mark.slow
def test_progressive_plan_applies_to_the_original(mnist_run: PruneRun) -> None:
    candidate = progressive(mnist_run, "l2", 2, target_macs=0.4, recover="none")
    rounds = candidate.plan.meta["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["target_macs"] == pytest.approx(0.4 ** 0.5)
    assert rounds[1]["macs_fraction"] <= 0.4 and candidate.plan.model_sha256 == mnist_run.prepared.sha256
    # without recovery, the composed plan applied to the original is the two rounds' model
    again = apply_plan(mnist_run.prepared.model, mnist_run.prepared.index, dict(candidate.plan.keep))
    feeds = {"input": mnist_run.data.take(0, 32)[0]["x"]}
    ours, _ = make_session(candidate.model.SerializeToString())
    theirs, _ = make_session(again.SerializeToString())
    name = again.graph.input[0].name
    np.testing.assert_allclose(ours.run(None, {name: feeds["input"]})[0], theirs.run(None, {name: feeds["input"]})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_allocation_rule_restores_the_old_plan_and_steps_are_checked(tmp_path, capsys) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(demo_model_path().read_bytes())
    common = ["prune", str(model), "--data", "mnist", "--limit", "256", "--method", "l2", "--target-macs", "0.5",
              "--recover", "none", "-q"]
    assert main([*common, "--allocation", "rule", "-o", str(tmp_path / "rule.onnx")]) == 0
    plan = json.loads((tmp_path / "rule.onnx.plan.json").read_text())
    run = PruneRun(model, None, progress=False)
    old = select_channels(run.scores("l2"), run.prepared.index, target_macs=0.5)
    assert plan["groups"] == {g: {"keep": list(k)} for g, k in old.keep.items()}
    assert main([*common, "-o", str(tmp_path / "measured.onnx")]) == 0
    meta = json.loads((tmp_path / "measured.onnx.plan.json").read_text())["meta"]
    assert meta["allocation"]["mode"] == "measured" and meta["allocation"]["passes"] > 1
    with pytest.raises(SystemExit) as stop:
        main([*common, "--steps", "0", "-o", str(tmp_path / "x.onnx")])
    assert stop.value.code == 2
    assert main([*common, "--steps", "2", "-o", str(tmp_path / "two.onnx")]) == 0
    doc = json.loads((tmp_path / "two.onnx.plan.json").read_text())
    assert [r["round"] for r in doc["meta"]["rounds"]] == [1, 2]
    assert main(["apply", str(model), str(tmp_path / "two.onnx.plan.json"), "-o", str(tmp_path / "again.onnx"),
                 "-q"]) == 0  # the composed plan applies to the original and gives the same structure
    assert count(onnx.load(str(tmp_path / "again.onnx"))).macs == count(onnx.load(str(tmp_path / "two.onnx"))).macs


def test_relative_error_damage_of_a_model_that_is_not_a_classifier() -> None:
    from pipeline.selection.sensitivity import _reference

    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(8, 1, 4, 4)), rng.normal(size=(8, 3))]
    reference = _reference(maps, None)
    assert reference.damage(maps) == 0.0 and reference.collapse() == 1.0
    means = [np.broadcast_to(m.mean(axis=0), m.shape) for m in maps]
    assert reference.damage(means) == pytest.approx(1.0)  # predicting the mean output: the collapse
    assert reference.damage([maps[0] + 0.1, maps[1]]) > 0


def test_kl_per_decision_for_sequences_and_maps() -> None:
    from pipeline.selection.sensitivity import _decision_rows, _kl, _probabilities, _reference

    rng = np.random.default_rng(0)
    seq = rng.normal(size=(4, 5, 7))  # (N, T, K) logits
    reference = _reference([seq], "sequence")
    assert reference.damage([seq]) == 0.0
    other = seq + rng.normal(scale=0.5, size=seq.shape)
    brute = np.mean([_kl(_probabilities(seq[n]), _probabilities(other[n])) for n in range(4)])
    assert reference.damage([other]) == pytest.approx(brute)  # the mean over every (sample, time step)
    assert reference.damage([seq + 3.0]) == pytest.approx(0.0, abs=1e-12)  # a shift of all logits decides the same
    maps = rng.normal(size=(2, 3, 4, 4))  # (N, K, H, W)
    rows = _decision_rows(maps, "map")
    assert rows.shape == (32, 3) and np.allclose(rows[5], _probabilities(maps[0, :, 1, 1][None])[0])
    prob = 1.0 / (1.0 + np.exp(-rng.normal(size=(2, 1, 4, 4))))  # a probability map: rows (y, 1 - y)
    rows = _decision_rows(prob, "map")
    assert np.allclose(rows[:, 0], prob.reshape(-1)) and np.allclose(rows.sum(axis=1), 1.0)
