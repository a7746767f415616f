"""R3 recovery on real architectures: every torchvision zoo model (legacy exporter), one seeded random plan.

The refit touches every kind of layer the zoo holds (dense, depthwise and grouped convs, SE convs on pooled inputs,
Flatten -> Gemm heads, concatenated branches); whatever the data, the recovered model must keep the interface, pass
the full checker and compute what its mask oracle computes (:func:`tests.oracles.recovered_reference`: the refit
weights placed in the original-size model at the kept rows and slices, the plan applied as a mask). A fixed ridge
makes every layer take its refit (the held-out guard would otherwise keep some layers' weights on 4 random images).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from graph_ops.channels import analyze
from graph_ops.io import load_model
from tests.models import ZOO
from tests.oracles import check_lstsq_mask_reference

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", ZOO)
def test_zoo_lstsq_recovery_equals_its_mask_reference(name: str, zoo_model: Callable[[str, str], Path]) -> None:
    model = load_model(zoo_model(name, "legacy"))
    pruned, recovered, _ = check_lstsq_mask_reference(model, analyze(model))
    assert [(v.name, str(v.type)) for v in recovered.graph.output] == \
        [(v.name, str(v.type)) for v in pruned.graph.output]
