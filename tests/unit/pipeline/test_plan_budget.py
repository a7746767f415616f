"""Budgeted plans on the shipped MNIST CNN: achieved MACs within one rounding step, exact surgery, determinism.

Data-free scores (``l2`` and seeded ``random``) are planned with ``select_channels(target_macs=t, round_to=8)``;
the contract and the definition of "one rounding step" are in ``tests.budget_checks`` (the zoo version of this test
is ``tests/zoo/test_zoo_plan.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from pipeline.prune.orchestrate import PreparedModel, keep_lists, prepare, score
from pipeline.selection.allocate import select_channels
from tests.budget_checks import check_budget
from tests.oracles import assert_same_outputs, random_feeds

MNIST_CNN = Path(__file__).resolve().parents[3] / "pipeline" / "assets" / "mnist_cnn.onnx"
TARGETS = (0.75, 0.5, 0.3)


@pytest.fixture(scope="module")
def prepared() -> PreparedModel:
    return prepare(MNIST_CNN)


@pytest.mark.parametrize("target", TARGETS, ids=[f"macs{t}" for t in TARGETS])
@pytest.mark.parametrize("method", ["l2", "random"])
def test_budget_within_one_step(prepared: PreparedModel, method: str, target: float) -> None:
    plan = select_channels(score(prepared, None, method), prepared.index, target_macs=target, round_to=8)
    pruned = apply_plan(prepared.model, prepared.index, keep_lists(plan))
    check = check_budget(plan, prepared.index, prepared.model, pruned, target)
    assert check.reached and check.step > 0
    again = select_channels(score(prepared, None, method), prepared.index, target_macs=target, round_to=8)
    assert again.to_json() == plan.to_json()


def test_budget_plan_pruned_equals_masked(prepared: PreparedModel) -> None:
    plan = select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.5, round_to=8)
    keep = keep_lists(plan)
    assert keep
    feeds = random_feeds(prepared.model, np.random.default_rng(0), batch=2)
    assert_same_outputs(zero_channels(prepared.model, prepared.index, keep),
                        apply_plan(prepared.model, prepared.index, keep), feeds, rtol=1e-4)


def test_unreachable_budget_is_reported(prepared: PreparedModel) -> None:
    plan = select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.01, round_to=8)
    pruned = apply_plan(prepared.model, prepared.index, keep_lists(plan))
    check = check_budget(plan, prepared.index, prepared.model, pruned, 0.01)
    assert not check.reached and check.achieved > 0.01
