"""Surgery on real architectures: every torchvision zoo model, both exporters, against the mask oracle.

For each canonical zoo model (``tests.models.export_zoo``): analysis gives every frozen group a reason and leaves
more than half of the Conv output channels prunable (shufflenet's channel shuffles freeze the groups they move, by
design: a shuffle is ambiguous; regnet_y_400mf's grouped convs are pruned per conv group, so its groups around
them are in equal blocks, not frozen);
keeping everything reproduces the outputs; three seeded random plans (25-90 % kept per group) give the same outputs
as the mask oracle (error <= 1e-4 of the largest output), pass the full checker, and their MACs and params equal the
cost model's prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from graph_ops.channels import analyze, prunable_share
from graph_ops.io import load_model
from tests.models import EXPORTERS, ZOO
from tests.oracles import check_exact_surgery, random_feeds

pytestmark = pytest.mark.zoo

BLOCKED = {"regnet_y_400mf"}  # grouped convolutions: some groups come in equal blocks


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_pruned_equals_masked(name: str, exporter: str, zoo_model: Callable[[str, str], Path],
                                  record_property: Callable[[str, object], None]) -> None:
    model = load_model(zoo_model(name, exporter))
    index = analyze(model)
    assert all(g.frozen.strip() for g in index.groups if g.frozen is not None)
    share = prunable_share(model, index)
    record_property("prunable_share", round(share, 4))
    reasons = [g.frozen for g in index.groups if g.frozen]
    assert share > 0.5, reasons
    assert any(g.blocks > 1 for g in index.groups) == (name in BLOCKED)
    _, equal = check_exact_surgery(model, index, random_feeds(model, np.random.default_rng(0), batch=1))
    assert equal  # predicted MACs and params == counted
