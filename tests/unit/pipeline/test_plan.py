"""Plan files (round trip, every load and validation error) and the global budget allocation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graph_ops.groups import ChannelGroup, ChannelGroupIndex, CostTerm
from pipeline.errors import PlanValidationError, UserInputError
from pipeline.selection.allocate import select_channels
from pipeline.selection.plan import PruningPlan
from pipeline.selection.scorers import ChannelScores

SHA = "a" * 64
SIZES = {"g1": 32, "g2": 60, "g3": 48, "g4": 64, "g5": 16}


def _index() -> ChannelGroupIndex:
    """input(3, frozen, no producers) -> conv1 g1 -> conv2 g2 -> depthwise g2 ; conv3(g1) g3 ;
    concat[g2, g3] -> conv4 g4 -> gemm(10).

    g5 is frozen (an extra branch).
    """
    hw = 16 * 16

    def conv(node: str, ins: tuple[str, ...], out: str, in_fixed: int = 0, op: str = "Conv") -> CostTerm:
        return CostTerm(node=node, op_type=op, macs_coeff=9.0 * hw, params_coeff=9.0, in_fixed=in_fixed,
                        in_groups=ins, out_fixed=0, out_groups=(out,), bias_params=1.0)

    cost = (conv("conv1", ("input",), "g1"), conv("conv2", ("g1",), "g2"), conv("dw", (), "g2", in_fixed=1),
            conv("conv3", ("g1",), "g3"), conv("conv4", ("g2", "g3"), "g4"), conv("conv5", ("g1",), "g5"),
            CostTerm(node="fc", op_type="Gemm", macs_coeff=16.0, params_coeff=16.0, in_fixed=0, in_groups=("g4",),
                     out_fixed=10, out_groups=(), bias_params=0.0))
    producers = {"g1": ("conv1",), "g2": ("conv2", "dw"), "g3": ("conv3",), "g4": ("conv4",), "g5": ("conv5",)}
    graph_input = ChannelGroup(id="input", size=3, producers=(), consumers=("conv1",), probes=(),
                               frozen="produced by graph input 'input'")
    groups = (graph_input, *(ChannelGroup(id=g, size=s, producers=producers[g], consumers=(), probes=(f"{g}_relu",),
                                          frozen="unsupported consumer Transpose at t" if g == "g5" else None)
                             for g, s in SIZES.items()))
    return ChannelGroupIndex(groups=groups, cost=cost, other_macs=1000.0, other_params=10.0)


def _scores(seed: int, retention: bool) -> ChannelScores:
    rng = np.random.default_rng(seed)
    scores = {g: rng.random(s) for g, s in SIZES.items() if g != "g5"}
    curves = {}
    if retention:
        for g in scores:
            steps = np.sort(rng.random(SIZES[g]))
            curves[g] = np.concatenate(([0.0], np.cumsum(steps) / steps.sum()))
    return ChannelScores(method="di" if retention else "l2", params={}, scores=scores, retention=curves,
                         order={g: np.argsort(v, kind="stable") for g, v in scores.items()} if retention else {},
                         model_sha256=SHA)


def _ladder_ok(width: int, size: int, round_to: int) -> bool:
    return width == size or width % round_to == 0


def _widths(plan: PruningPlan) -> dict[str, int]:
    return {"input": 3, **SIZES, **{g: len(k) for g, k in plan.keep.items()}}


@pytest.mark.parametrize("retention", [True, False], ids=["retention", "score-mass"])
@pytest.mark.parametrize("target", [0.9, 0.7, 0.5], ids=lambda t: f"macs{t}")
def test_budget_met_within_one_rounding_step(retention: bool, target: float) -> None:
    index = _index()
    plan = select_channels(_scores(0, retention), index, target_macs=target, round_to=8, min_channels=8)
    full = index.predict()[0]
    widths = _widths(plan)
    fraction = index.predict(widths)[0] / full
    assert plan.meta["reached"] is True and fraction <= target
    assert fraction == pytest.approx(plan.meta["macs_fraction"])
    undo = [index.predict({**widths, g: min(widths[g] + 8 - widths[g] % 8, SIZES[g])})[0] / full
            for g in plan.keep]
    assert max(undo) > target  # reverting one step of some group misses the target: at most one step over
    for g, w in widths.items():
        assert g == "input" or (_ladder_ok(w, SIZES[g], 8) and w >= 8)
    assert "g1" not in plan.keep and "g4" not in plan.keep and "g5" not in plan.keep


def test_params_target() -> None:
    index = _index()
    plan = select_channels(_scores(1, True), index, target_params=0.6)
    assert index.predict(_widths(plan))[1] / index.predict()[1] <= 0.6 and plan.meta["reached"]


def test_protect_is_respected() -> None:
    plan = select_channels(_scores(2, True), _index(), target_macs=0.6, protect=("g2",))
    assert "g2" not in plan.keep and "g3" in plan.keep


def test_ends_prunable_when_asked() -> None:
    plan = select_channels(_scores(3, True), _index(), target_macs=0.3, keep_first_and_last=False)
    assert {"g1", "g4"} <= set(plan.keep)


def test_unreachable_target_is_reported() -> None:
    plan = select_channels(_scores(4, True), _index(), target_macs=0.01, min_channels=16)
    assert plan.meta["reached"] is False and "not reached" in plan.meta["notes"][0]
    assert all(len(plan.keep[g]) == 16 for g in ("g2", "g3"))
    note = plan.meta["notes"][0]
    assert "2 groups at their minimum width 16" in note and "protected by default" in note


def test_unknown_protect_id_is_refused() -> None:
    with pytest.raises(UserInputError, match="g_typo"):
        select_channels(_scores(2, True), _index(), target_macs=0.6, protect=("g2", "g_typo"))


def test_keep_follows_elimination_order() -> None:
    scores = _scores(5, True)
    plan = select_channels(scores, _index(), target_macs=0.6)
    for gid, keep in plan.keep.items():
        order = scores.order[gid]
        assert keep == tuple(sorted(order[SIZES[gid] - len(keep):].tolist()))


def test_plan_json_is_byte_identical_across_runs(tmp_path: Path) -> None:
    first = select_channels(_scores(6, False), _index(), target_macs=0.5).save(tmp_path / "a.json")
    second = select_channels(_scores(6, False), _index(), target_macs=0.5).save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("kwargs", [{}, {"target_macs": 0.0}, {"target_params": 1.5}], ids=["none", "zero", "over"])
def test_bad_targets(kwargs: dict) -> None:
    with pytest.raises(UserInputError):
        select_channels(_scores(0, True), _index(), **kwargs)


def test_plan_file_round_trip(tmp_path: Path) -> None:
    plan = PruningPlan(model_sha256=SHA, keep={"g2": (5, 1, 3)}, meta={"method": "di"})
    loaded = PruningPlan.load(plan.save(tmp_path / "p.json"))
    assert loaded == plan and loaded.keep["g2"] == (1, 3, 5)
    loaded.validate(_index(), SHA)
    assert "1 groups pruned" in loaded.summary()


@pytest.mark.parametrize(("text", "match"), [
    ("{", "not JSON"),
    ('{"format": "diprune.plan/2", "model_sha256": "x", "groups": {}}', "not a plan file"),
    ('[1, 2]', "not a plan file"),
    ('{"format": "diprune.plan/1", "model_sha256": 3, "groups": {}}', "must be a string"),
    ('{"format": "diprune.plan/1", "model_sha256": "x", "groups": {"g2": {"keep": [1.5]}}}', "integer"),
    ('{"format": "diprune.plan/1", "model_sha256": "x", "groups": {"g2": [1]}}', "integer"),
], ids=["not-json", "wrong-format", "not-object", "bad-sha", "float-index", "bare-list"])
def test_plan_load_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(UserInputError, match=match):
        PruningPlan.load(path)


def test_plan_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not found"):
        PruningPlan.load(tmp_path / "nope.json")


@pytest.mark.parametrize(("sha", "keep", "match"), [
    ("b" * 64, {"g2": (0,)}, "plan was made for model aaaaaaaaaaaa, this model is bbbbbbbbbbbb"),
    (SHA, {"nope": (0,)}, "unknown group 'nope'"),
    (SHA, {"g5": (0, 1)}, "group 'g5' is frozen"),
    (SHA, {"g2": (0, 60)}, r"out of range \[0, 60\]"),
    (SHA, {"g2": (-1, 3)}, r"out of range \[-1, 3\]"),
    (SHA, {"g2": (3, 3)}, "twice"),
    (SHA, {"g2": ()}, "keeps no channel"),
], ids=["sha", "unknown", "frozen", "out-of-range", "negative", "duplicate", "empty"])
def test_validation_errors(sha: str, keep: dict, match: str) -> None:
    with pytest.raises(PlanValidationError, match=match):
        PruningPlan(model_sha256=SHA, keep=keep).validate(_index(), sha)


def test_a_producer_with_a_layout_free_input_is_not_a_first_layer() -> None:
    """A conv reading a tensor without channel layout (e.g. after a channel shuffle) is not protected as 'first'."""
    hw = 8 * 8
    cost = (CostTerm(node="stem", op_type="Conv", macs_coeff=9.0 * hw, params_coeff=9.0, in_fixed=0,
                     in_groups=("input",), out_fixed=0, out_groups=("a",), bias_params=1.0),
            CostTerm(node="after_shuffle", op_type="Conv", macs_coeff=hw, params_coeff=1.0, in_fixed=64, in_groups=(),
                     out_fixed=0, out_groups=("b",), bias_params=1.0),
            CostTerm(node="fc", op_type="Gemm", macs_coeff=1.0, params_coeff=1.0, in_fixed=0, in_groups=("c",),
                     out_fixed=10, out_groups=(), bias_params=0.0),
            CostTerm(node="mix", op_type="Conv", macs_coeff=hw, params_coeff=1.0, in_fixed=0, in_groups=("a", "b"),
                     out_fixed=0, out_groups=("c",), bias_params=1.0))
    groups = (ChannelGroup(id="input", size=3, producers=(), consumers=("stem",), probes=(), frozen="graph input"),
              ChannelGroup(id="a", size=64, producers=("stem",), consumers=("mix",), probes=("a",)),
              ChannelGroup(id="b", size=64, producers=("after_shuffle",), consumers=("mix",), probes=("b",)),
              ChannelGroup(id="c", size=64, producers=("mix",), consumers=("fc",), probes=("c",)))
    index = ChannelGroupIndex(groups=groups, cost=cost)
    scores = ChannelScores(method="l2", params={}, scores={g: np.arange(64.0) for g in ("a", "b", "c")})
    plan = select_channels(scores, index, target_macs=0.6, round_to=8)
    assert "a" not in plan.keep  # the stem (reads the graph input) stays whole
    assert "c" not in plan.keep  # the classifier input stays whole
    assert len(plan.keep["b"]) < 64  # the conv after the shuffle is prunable


@pytest.mark.parametrize("retention", [False, True], ids=["scores", "retention"])
@pytest.mark.parametrize("target", [0.8, 0.55, 0.35, 0.2])
def test_fill_back_stays_within_the_budget_and_is_at_least_as_close(target: float, retention: bool) -> None:
    index = _index()
    scores = _scores(3, retention)
    full = index.predict()[0]
    plain = select_channels(scores, index, target_macs=target, keep_first_and_last=False, fill_back=False,
                            fine_share=None)
    filled = select_channels(scores, index, target_macs=target, keep_first_and_last=False, fine_share=None)
    assert plain.meta["reached"] and filled.meta["reached"]
    assert plain.meta["macs_fraction"] <= filled.meta["macs_fraction"] <= target
    widths = {g.id: len(filled.keep.get(g.id, range(g.size))) for g in index.groups}
    for gid in filled.keep:  # no shrunk group can move up one step without breaking the budget
        up = min(widths[gid] + 8, index.group(gid).size)
        assert index.predict({**widths, gid: up})[0] / full > target, gid
    assert (filled.meta["filled_back"] > 0) == (dict(filled.keep) != dict(plain.keep))
    assert f"predicted MACs x{filled.meta['macs_fraction']:.3f}" in filled.summary()
    assert f"(target macs {target:g})" in filled.summary()
    # the plan states the bound: the target is within the smallest step that could be added back
    assert 0 <= target - filled.meta["macs_fraction"] < filled.meta["step_back"]["macs"]


def test_a_group_holding_a_large_share_of_the_cost_steps_finer() -> None:
    """g4 (64 channels, read by a wide Gemm) holds most of the MACs: its 8-channel step is more than 10 % of the
    model, so it steps by 4, and the plan says so."""
    hw = 16 * 16
    cost = (CostTerm("conv", "Conv", 9.0 * hw, 9.0, 3, (), 0, ("g",), 1.0),
            CostTerm("conv2", "Conv", 9.0 * hw, 9.0, 0, ("g",), 0, ("h",), 1.0),
            CostTerm("fc", "Gemm", 16.0, 16.0, 0, ("h",), 10, (), 0.0))
    groups = (ChannelGroup("g", 16, ("conv",), ("conv2",), ("g_relu",)),
              ChannelGroup("h", 64, ("conv2",), ("fc",), ("h_relu",)))
    index = ChannelGroupIndex(groups=groups, cost=cost)
    scores = ChannelScores(method="l2", params={}, scores={"g": np.arange(16.0), "h": np.arange(64.0)},
                           model_sha256=SHA)
    plan = select_channels(scores, index, target_macs=0.7, keep_first_and_last=False)
    assert plan.meta["fine_steps"].get("h") == 4 and any("group h steps by 4" in n for n in plan.meta["notes"])
    assert len(plan.keep["h"]) % 4 == 0 and plan.meta["macs_fraction"] <= 0.7
    coarse = select_channels(scores, index, target_macs=0.7, keep_first_and_last=False, fine_share=None)
    assert 0.7 - plan.meta["macs_fraction"] <= 0.7 - coarse.meta["macs_fraction"]
