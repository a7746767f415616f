"""Physical surgery against the mask oracle on every motif, plus plan validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest

from graph_ops.channels import analyze
from graph_ops.cost import count
from graph_ops.errors import PlanValidationError
from graph_ops.io import verify_model
from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from tests.graphs_refine import ALL_MOTIFS as MOTIFS
from tests.oracles import assert_same_outputs, random_feeds, random_valid_plan, run_ort

MOTIF_IDS = sorted(MOTIFS)
SEEDS = (0, 1, 2)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("motif", MOTIF_IDS)
def test_pruned_equals_masked(motif: str, seed: int) -> None:
    model, _ = MOTIFS[motif]()
    index = analyze(model)
    rng = np.random.default_rng(seed)
    plan = random_valid_plan(index, rng)
    pruned = apply_plan(model, index, plan)
    masked = zero_channels(model, index, plan)
    verify_model(pruned)
    assert_same_outputs(masked, pruned, random_feeds(model, rng), rtol=1e-4)
    widths = {gid: len(kept) for gid, kept in plan.items()}
    macs, params = index.predict(widths)
    report = count(pruned)
    assert (macs, params) == (report.macs, report.params)
    assert report.params < count(model).params


@pytest.mark.parametrize("motif", MOTIF_IDS)
def test_keep_all_reproduces_original(motif: str) -> None:
    model, _ = MOTIFS[motif]()
    index = analyze(model)
    plan = {g.id: list(range(g.size)) for g in index.groups}
    feeds = random_feeds(model, np.random.default_rng(3))
    kept = apply_plan(model, index, plan)
    for a, b in zip(run_ort(model, feeds), run_ort(kept, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_input_model_is_not_mutated() -> None:
    model, _ = MOTIFS["concat"]()
    before = model.SerializeToString()
    index = analyze(model)
    plan = random_valid_plan(index, np.random.default_rng(0))
    apply_plan(model, index, plan)
    zero_channels(model, index, plan)
    assert model.SerializeToString() == before


def test_pruned_initializers_are_new_names_and_old_ones_dropped() -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    index = analyze(model)
    first = next(g for g in index.groups if g.prunable)
    pruned = apply_plan(model, index, {first.id: [0, 2, 5]})
    conv = next(n for n in pruned.graph.node if n.op_type == "Conv")
    assert conv.input[1].endswith("__pruned")
    weight = next(t for t in pruned.graph.initializer if t.name == conv.input[1])
    assert weight.dims[0] == 3
    names = {t.name for t in pruned.graph.initializer}
    assert model.graph.node[0].input[1] not in names


def test_depthwise_group_attribute_follows_width() -> None:
    model, _ = MOTIFS["depthwise_separable"]()
    index = analyze(model)
    group = next(g for g in index.groups if g.prunable and g.size == 8)
    pruned = apply_plan(model, index, {group.id: [1, 3, 4]})
    depthwise = [n for n in pruned.graph.node if n.op_type == "Conv"][1]
    assert onnx.helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) == 3


def _plan_errors() -> list[tuple[str, object, str]]:
    return [
        ("unknown_group", lambda idx, g: {"nope": [0]}, "unknown group 'nope'"),
        ("frozen_group", lambda idx, g: {idx.groups[0].id: [0]}, "is frozen (produced by graph input"),
        ("empty", lambda idx, g: {g.id: []}, "keeps no channel"),
        ("out_of_range", lambda idx, g: {g.id: [0, g.size]}, "out of range"),
        ("negative", lambda idx, g: {g.id: [-1, 0]}, "out of range"),
        ("duplicate", lambda idx, g: {g.id: [1, 1]}, "twice"),
        ("not_integers", lambda idx, g: {g.id: ["a"]}, "must be integers"),
    ]


@pytest.mark.parametrize(("case", "make", "message"), _plan_errors(), ids=[c[0] for c in _plan_errors()])
def test_invalid_plans_are_rejected(case: str, make: Callable[..., dict], message: str) -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    index = analyze(model)
    group = next(g for g in index.groups if g.prunable)
    with pytest.raises(PlanValidationError, match=message.replace("(", r"\(")):
        apply_plan(model, index, make(index, group))
    with pytest.raises(PlanValidationError):
        zero_channels(model, index, make(index, group))


def test_frozen_group_kept_whole_is_allowed() -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    index = analyze(model)
    frozen = index.groups[0]
    pruned = apply_plan(model, index, {frozen.id: list(range(frozen.size))[::-1]})
    assert count(pruned).params == count(model).params


def test_index_of_another_model_is_rejected() -> None:
    model, _ = MOTIFS["conv_bn_relu"]()
    other, _ = MOTIFS["residual"]()
    with pytest.raises(PlanValidationError, match="does not belong to this model"):
        apply_plan(model, analyze(other), {})
