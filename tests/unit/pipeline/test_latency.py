"""The latency model, the latency planner and its closed loop, ``--target-latency`` on the CLI and in run configs.

Real onnxruntime sessions on the shipped demo CNN; nothing asserts a speed (the machine is shared): only structure,
consistency and the planner's logic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.deployment.latency_build import key_digest, latency_model_for, table_key
from pipeline.deployment.latency_fit import UNMATCHED, _match, nnls
from pipeline.deployment.latency_model import KernelModel, LatencyModel, LatencyTarget, Width, effective
from pipeline.deployment.latency_plan import (
    RANKINGS,
    LatencyBudget,
    closed_loop,
    plan_for_latency,
    select_for_latency,
)
from pipeline.deployment.timing import interleaved_ratios, profile_kernels
from pipeline.errors import UserInputError
from pipeline.job.config import config_from_dict
from pipeline.model.prepare import PreparedModel, prepare
from pipeline.prune.demo import demo_model_path
from pipeline.prune.orchestrate import PruneRun
from pipeline.selection.plan import PruningPlan

pytestmark = pytest.mark.slow  # real onnxruntime measurements (the shared model is measured once, ~15 s)

TARGET = LatencyTarget(threads=1)  # what the CLI measures with --latency-threads 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latency-cache")


@pytest.fixture(scope="module")
def prepared() -> PreparedModel:
    return prepare(demo_model_path())


@pytest.fixture(scope="module")
def model(prepared: PreparedModel, cache: Path) -> LatencyModel:
    return latency_model_for(prepared, TARGET, cache)


# ----------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(("kernel", "expected"), [
    ("relu_38_nchwc", "relu_38"),           # NCHWc kernel named after a tensor
    ("fused /6/Gemm", "/6/Gemm"),           # a fused node
    ("node_silu_3/QuickGeluFusion/", "node_silu_3"),
    ("relu_3", "relu_3"),                   # exact
    ("relu_38", None),                      # "relu_3" is not a prefix at a separator
    ("ReorderOutput_token_4", None),
], ids=["nchwc", "fused", "quickgelu", "exact", "no-partial-token", "reorder"])
def test_kernel_names_match_the_longest_original_name_at_a_separator(kernel: str, expected: str | None) -> None:
    names = {"relu_3": 0, "relu_38": 1, "/6/Gemm": 2, "node_silu_3": 3}
    if kernel == "relu_38":
        names = {"relu_3": 0}
    assert _match(kernel, names) == expected


def test_nnls_recovers_non_negative_coefficients_and_clips_negative_ones(rng: np.random.Generator) -> None:
    x = np.column_stack([np.ones(12), rng.uniform(0.1, 1, 12), rng.uniform(0.1, 1, 12), rng.uniform(0.1, 1, 12)])
    coef = np.array([2.0, 30.0, 0.0, 5.0])
    np.testing.assert_allclose(nnls(x, x @ coef), coef, atol=1e-8)
    fitted = nnls(x, x @ np.array([1.0, 10.0, -4.0, 0.0]))
    assert np.all(fitted >= 0)


def test_widths_round_up_to_the_runtime_block() -> None:
    assert [effective(w, 16) for w in (8, 16, 17, 120, 128)] == [16, 16, 32, 128, 128]
    assert effective(120, 1) == 120
    assert Width(4.0, (("a", 1.0), ("b", 0.5))).at({"a": 8, "b": 16}) == 20.0


def test_profile_lists_kernels_with_durations_and_ratios_of_a_model_to_itself_are_near_one(prepared: PreparedModel) -> None:
    blob = prepared.model.SerializeToString()
    profile = profile_kernels(blob, threads=1, runs=3, min_seconds=0.0)
    assert profile.kernels and all(k.median_us >= 0 for k in profile.kernels)
    assert {"Conv", "Gemm"} <= {k.op for k in profile.kernels} | {"Conv"}
    ratios = interleaved_ratios([blob, blob], threads=1, rounds=3, round_seconds=0.0)
    assert ratios.ratios[0] == 1.0 and 0.5 < ratios.ratios[1] < 2.0


# ----------------------------------------------------------------------------------------------- the model


def test_every_conv_and_gemm_kernel_is_tied_to_a_cost_term(model: LatencyModel, prepared: PreparedModel) -> None:
    terms = {t.node for t in prepared.index.cost}
    for kernel in model.kernels:
        if kernel.kind == "term":
            assert kernel.id in terms
        assert all(c >= 0 for c in kernel.coef)
    tied = {k.id for k in model.kernels if k.kind == "term"}
    assert tied == terms  # the demo CNN: every Conv and Gemm runs as (part of) a kernel
    assert UNMATCHED not in {k.id for k in model.kernels if k.kind != "fixed"}


def test_prediction_is_one_for_the_full_model_and_shrinks_with_the_widths(model: LatencyModel, prepared: PreparedModel) -> None:
    assert model.ratio() == pytest.approx(1.0)
    groups = [g for g in prepared.index.groups if g.prunable]
    half = {g.id: max(8, g.size // 2) for g in groups}
    quarter = {g.id: max(8, g.size // 4) for g in groups}
    assert 0 < model.ratio(quarter) <= model.ratio(half) <= 1.0
    assert model.validation["errors"] and len(model.validation["errors"]) == 3


def test_latency_model_round_trips_through_its_cache_file(model: LatencyModel, prepared: PreparedModel, cache: Path) -> None:
    files = list(cache.glob("latency-*.json"))
    assert len(files) == 1
    again = latency_model_for(prepared, TARGET, cache)  # read back, not measured again
    assert again.to_json() == model.to_json()
    assert LatencyModel.from_json(model.to_json()).predict_ms({}) == pytest.approx(model.predict_ms())
    other = table_key(prepared, LatencyTarget(threads=1, batch=8), 8, 8)
    assert key_digest(other) != key_digest(table_key(prepared, TARGET, 8, 8))


def test_targets_without_an_active_onnxruntime_provider_are_refused(prepared: PreparedModel) -> None:
    with pytest.raises(UserInputError, match="onnxruntime backends"):
        latency_model_for(prepared, LatencyTarget(backend="tensorrt"), None)
    with pytest.raises(UserInputError, match="fp32"):
        latency_model_for(prepared, LatencyTarget(precision="int8"), None)


# ----------------------------------------------------------------------------------------------- the planner


def _synthetic(prepared: PreparedModel, slow: str) -> LatencyModel:
    """A latency model in which only group ``slow``'s width costs time (its producer term)."""
    term = next(t for t in prepared.index.cost if slow in t.out_groups)
    widths = prepared.index.full_widths()
    kernel = KernelModel(term.node, ("Conv",), "term", Width(float(term.in_fixed), tuple((g, 1.0) for g in term.in_groups)),
                         Width(float(term.out_fixed), tuple((g, 1.0) for g in term.out_groups)),
                         (1.0, 1.0), 1, (0.0, 0.0, 0.0, 0.0))
    full = kernel.w_in.at(widths), kernel.w_out.at(widths)
    kernel = KernelModel(kernel.id, kernel.ops, kernel.kind, kernel.w_in, kernel.w_out, full, 1, (10.0, 0.0, 0.0, 90.0))
    return LatencyModel({"block": 1}, widths, (kernel,), 1.0, 0.0)


def test_the_latency_planner_spends_the_budget_where_the_time_is(prepared: PreparedModel) -> None:
    run = PruneRun(prepared, None, progress=False)
    scores = run.scores("l2")
    slow = next(g.id for g in prepared.index.groups if g.prunable and g.id not in
                {"/stem/stem.0/stem.0.0/Conv_output_0"} and g.size >= 32)
    plan = select_for_latency(scores, prepared.index, _synthetic(prepared, slow), target_latency=0.5, round_to=8)
    assert plan.meta["reached"] and plan.meta["latency_fraction"] <= 0.5
    assert set(plan.keep) == {slow}  # only the group whose width costs time is pruned
    both = select_for_latency(scores, prepared.index, _synthetic(prepared, slow), target_latency=0.5,
                              target_macs=0.3, round_to=8)
    assert both.meta["macs_fraction"] <= 0.3 and both.meta["latency_fraction"] <= 0.5 and len(both.keep) > 1


def _width_model(prepared: PreparedModel) -> LatencyModel:
    """Time that grows with the total channel count of every group (not the MACs' pattern)."""
    widths = prepared.index.full_widths()
    every = Width(1.0, tuple((g, 1.0) for g in widths))
    full = every.at(widths), every.at(widths)
    kernel = KernelModel("widths", ("Conv",), "term", every, every, full, 1, (10.0, 0.0, 0.0, 90.0))
    return LatencyModel({"block": 1}, widths, (kernel,), 1.0, 0.0)


def _macs_model(prepared: PreparedModel, seed: int) -> LatencyModel:
    """Time proportional to each node's MACs, times a random factor per node (a noisy MACs-like target)."""
    widths = prepared.index.full_widths()
    rng = np.random.default_rng(seed)
    kernels = []
    for term in prepared.index.cost:
        w_in = Width(float(term.in_fixed), tuple((g, 1.0) for g in term.in_groups))
        w_out = Width(float(term.out_fixed), tuple((g, 1.0) for g in term.out_groups))
        us = term.macs(widths) / 1e3 * float(rng.uniform(0.3, 3.0))
        kernels.append(KernelModel(term.node, (term.op_type,), "term", w_in, w_out, (w_in.at(widths), w_out.at(widths)),
                                   1, (0.0, us, 0.0, 0.0)))
    return LatencyModel({"block": 1}, widths, tuple(kernels), 1.0, 0.0)


@pytest.mark.parametrize(("which", "fraction", "winner"), [("widths", 0.8, "budgets"), ("macs", 0.5, "macs")])
def test_the_latency_planner_keeps_the_step_order_that_loses_least(prepared: PreparedModel, which: str,
                                                                    fraction: float, winner: str) -> None:
    """Each ranking alone, then both: the plan kept is the reached one of least information lost (on these two
    targets each ranking wins once)."""
    scores = PruneRun(prepared, None, progress=False).scores("l2")
    model = _width_model(prepared) if which == "widths" else _macs_model(prepared, 0)
    alone = {rank: select_for_latency(scores, prepared.index, model, target_latency=fraction, round_to=8,
                                      rankings=(rank,)) for rank in RANKINGS}
    assert all(p.meta["reached"] and p.meta["ranked_by"] == rank for rank, p in alone.items())
    assert alone["budgets"].keep != alone["macs"].keep
    both = select_for_latency(scores, prepared.index, model, target_latency=fraction, round_to=8)
    assert both.meta["ranked_by"] == winner and both.keep == alone[winner].keep
    assert both.meta["information_lost"] == min(p.meta["information_lost"] for p in alone.values())
    assert both.meta["information_lost_by_ranking"] == {r: p.meta["information_lost"] for r, p in alone.items()}
    assert both.meta["latency_fraction"] <= fraction


def test_the_latency_planner_refuses_an_unknown_ranking(prepared: PreparedModel) -> None:
    scores = PruneRun(prepared, None, progress=False).scores("l2")
    with pytest.raises(UserInputError, match="unknown step rankings"):
        select_for_latency(scores, prepared.index, _width_model(prepared), target_latency=0.6, rankings=("flops",))


def test_the_latency_planner_reports_an_unreachable_budget(prepared: PreparedModel) -> None:
    run = PruneRun(prepared, None, progress=False)
    slow = next(g.id for g in prepared.index.groups if g.prunable and g.size >= 32)
    plan = select_for_latency(run.scores("l2"), prepared.index, _synthetic(prepared, slow), target_latency=0.01)
    assert plan.meta["reached"] is False and "not reached" in plan.meta["notes"][0]


def _plan(predicted: float, lost: float) -> PruningPlan:
    keep = {"g": tuple(range(max(1, round(1000 * predicted))))}  # a different plan for every prediction
    return PruningPlan("sha", keep, {"latency_fraction": predicted, "information_lost": lost, "reached": True})


def test_closed_loop_corrects_a_biased_model_and_keeps_the_least_lossy_plan_in_the_band() -> None:
    def make(aim: float) -> PruningPlan:
        return _plan(round(aim, 3), 1 - aim)

    plan, tried = closed_loop(make, lambda p: 0.7 * p.meta["latency_fraction"], 0.5,
                              predicted=lambda p: p.meta["latency_fraction"], iterations=4)
    assert tried[0]["measured"] == pytest.approx(0.35)  # the model was 30 % pessimistic
    assert abs(0.7 * plan.meta["latency_fraction"] / 0.5 - 1) <= 0.05
    assert len(tried) == 2  # corrected once


def test_closed_loop_stops_when_the_planner_repeats_a_plan() -> None:
    plan, tried = closed_loop(lambda aim: _plan(0.9, 0.0), lambda p: 0.95, 0.5,
                              predicted=lambda p: p.meta["latency_fraction"], iterations=3)
    assert plan.meta["latency_fraction"] == 0.9 and len(tried) == 1


def test_closed_loop_without_a_plan_in_the_band_keeps_the_slowest_that_meets_the_budget() -> None:
    plans = iter([PruningPlan("sha", {"g": (0,)}, {"latency_fraction": 0.3, "information_lost": 3.0}),
                  PruningPlan("sha", {"g": (0, 1)}, {"latency_fraction": 0.4, "information_lost": 2.0}),
                  PruningPlan("sha", {"g": (0, 1, 2)}, {"latency_fraction": 0.8, "information_lost": 1.0})])
    plan, tried = closed_loop(lambda aim: next(plans), lambda p: p.meta["latency_fraction"], 0.6,
                              predicted=lambda p: 0.5, iterations=3)
    assert [t["measured"] for t in tried] == [0.3, 0.4, 0.8]
    assert plan.meta["latency_fraction"] == 0.4  # 0.8 is over the budget, 0.4 the slowest under it


def test_plan_for_latency_measures_and_records_every_try(prepared: PreparedModel, model: LatencyModel) -> None:
    run = PruneRun(prepared, None, progress=False)
    plan = plan_for_latency(prepared, run.scores("l2"), LatencyBudget(0.6, TARGET, iterations=2), model=model)
    record = plan.meta["latency"]
    assert 1 <= len(record["tries"]) <= 2
    assert 0 < record["measured_ratio"] < 1
    assert record["within_band"] == (abs(record["measured_ratio"] / 0.6 - 1) <= 0.10)
    assert plan.meta["target_latency"] == 0.6


# ----------------------------------------------------------------------------------------------- CLI and config


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copy(demo_model_path(), path)
    return path


def test_cli_plan_with_a_latency_budget(demo: Path, tmp_path: Path, cache: Path, model: LatencyModel,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    scores = tmp_path / "scores.json"
    assert main(["-q", "score", "--model", str(demo), "--method", "l2", "-o", str(scores)]) == 0
    out = tmp_path / "plan.json"
    code = main(["-q", "plan", str(scores), "--target-latency", "0.6", "--latency-threads", "1",
                 "--latency-iterations", "1", "--latency-cache", str(cache), "-o", str(out)])
    assert code == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["latency"]["model"]["key"] == key_digest(model.key)  # the cached model was used
    assert "measured latency x" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--target-latency", "0.5", "--backend", "tensorrt"], "onnxruntime backends"),
    (["--max-drop", "1", "--target-latency", "0.5", "--eval-data", "mnist"], "--max-drop searches"),
    (["--target-macs", "0.5", "--max-top1-drop", "1"], "add --quantize int8"),
    (["--target-macs", "0.5", "--quantize", "int8", "--max-top1-drop", "1"], "--eval-data"),
], ids=["tensorrt", "max-drop", "drop-without-quantize", "drop-without-eval"])
def test_cli_refuses_latency_and_int8_options_that_cannot_work(demo: Path, tmp_path: Path, argv: list[str],
                                                               message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", str(demo), "--data", "mnist", "--limit", "64", "--method", "l2", "--recover", "none",
                 "--latency-cache", "", "-o", str(tmp_path / "out.onnx"), *argv])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_cli_refuses_a_latency_fraction_outside_zero_one(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(demo), "--target-latency", "0", "-o", str(tmp_path / "o.onnx")])
    assert exit_info.value.code == 2


def test_run_config_takes_latency_budgets_and_int8(tmp_path: Path) -> None:
    doc = {"model": "m.onnx", "data": {"calibration": "mnist", "evaluation": "mnist"},
           "prune": {"methods": ["di"], "target_latency": [0.5, 0.33], "target_macs": 0.5, "quantize": "int8"},
           "output": "out"}
    config = config_from_dict(doc, tmp_path)
    assert config.prune.targets == (("macs", 0.5), ("latency", 0.5), ("latency", 0.33))
    assert config.prune.quantize == "int8"
    with pytest.raises(UserInputError, match=r"prune\.quantize"):
        config_from_dict({**doc, "prune": {**doc["prune"], "quantize": "int4"}}, tmp_path)
    with pytest.raises(UserInputError, match="target_latency"):
        config_from_dict({**doc, "prune": {"methods": ["di"], "target_latency": [1.5]}}, tmp_path)


def test_run_job_with_a_latency_budget_and_int8_twins(tmp_path: Path, cache: Path, model: LatencyModel) -> None:
    from pipeline.job.run import run_job

    output = tmp_path / "out"
    (output / "cache" / "latency").mkdir(parents=True)
    for file in cache.glob("latency-*.json"):  # the module's measurement, under the key the job will ask for
        shutil.copy(file, output / "cache" / "latency" / file.name)
    doc = {"model": str(demo_model_path()),
           "data": {"calibration": {"path": "mnist", "limit": 64}, "evaluation": {"path": "mnist", "limit": 128}},
           "prune": {"methods": ["l2"], "target_latency": 0.6, "recover": "none", "quantize": "int8"},
           "bench": {"threads": 1, "duration": 0.05, "warmup": 0.05, "iterations": 3, "rounds": 2},
           "output": str(output)}
    report = run_job(config_from_dict(doc, tmp_path), progress=False)
    names = [c.name for c in report.candidates]
    assert names == ["l2-latency0.6", "original-int8", "l2-latency0.6-int8"]
    fp32, int8 = report.candidate("l2-latency0.6"), report.candidate("l2-latency0.6-int8")
    assert fp32.target_kind == "latency" and fp32.target == 0.6
    assert (int8.macs, int8.params) == (fp32.macs, fp32.params)  # quantization keeps the arithmetic
    assert report.candidate("original-int8").macs_fraction == pytest.approx(1.0)
    assert (output / "candidates" / "l2-latency0.6-int8.onnx").is_file()
