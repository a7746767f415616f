"""Budgeted plans on every torchvision zoo model, both exporters: the MACs budget contract holds on real graphs.

For each canonical zoo model (``tests.models.export_zoo``, prepared with its input shape: the legacy shufflenet's
channel shuffles otherwise leave spatial sizes unknown, and a MACs budget is then refused), data-free scores (``l2`` and seeded ``random``) are
planned with ``select_channels(target_macs=t, round_to=8)`` for t in 0.75, 0.5, 0.3. Each plan is applied and the
MACs counted on the pruned graph (``graph_ops.cost.count``): the fraction is ``<= t`` and within one rounding step
of it, or the plan says ``reached: false`` and no movable group can shrink any more (``tests.budget_checks`` defines
both precisely); kept widths are multiples of 8; planning twice gives byte-identical plan JSON; and one plan per
model (l2, t = 0.5) gives the same outputs as the mask oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from graph_ops.mask import zero_channels
from graph_ops.prune import apply_plan
from pipeline.prune.orchestrate import keep_lists, prepare, score
from pipeline.selection.allocate import select_channels
from tests.budget_checks import check_budget
from tests.models import EXPORTERS, ZOO, input_shape
from tests.oracles import assert_same_outputs, random_feeds

pytestmark = pytest.mark.zoo

TARGETS = (0.75, 0.5, 0.3)
METHODS = ("l2", "random")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_plan_meets_budget(name: str, exporter: str, zoo_model: Callable[[str, str], Path],
                               record_property: Callable[[str, object], None]) -> None:
    prepared = prepare(zoo_model(name, exporter), {"input": input_shape(name)})  # static: every MACs known
    for method in METHODS:
        scores = score(prepared, None, method)
        for target in TARGETS:
            plan = select_channels(scores, prepared.index, target_macs=target, round_to=8)
            keep = keep_lists(plan)
            pruned = apply_plan(prepared.model, prepared.index, keep)
            check = check_budget(plan, prepared.index, prepared.model, pruned, target, counter=prepared.count)
            record_property(f"{method}@{target}", f"{check.achieved:.4f} step {check.step:.4f} "
                                                  f"reached {check.reached}")
            again = select_channels(score(prepared, None, method), prepared.index, target_macs=target, round_to=8)
            assert again.to_json() == plan.to_json()
            if method == "l2" and target == 0.5:
                feeds = random_feeds(prepared.model, np.random.default_rng(0), batch=1)
                assert_same_outputs(zero_channels(prepared.model, prepared.index, keep), pruned, feeds, rtol=1e-4)
