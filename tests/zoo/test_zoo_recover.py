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

import numpy as np
import onnx
import pytest

from graph_ops.channels import analyze
from graph_ops.io import load_model
from graph_ops.prune import apply_plan
from pipeline.data import from_iterable
from pipeline.recovery import recover
from tests.models import ZOO
from tests.oracles import assert_same_outputs, random_feeds, random_valid_plan, recovered_reference

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", ZOO)
def test_zoo_lstsq_recovery_equals_its_mask_reference(name: str, zoo_model: Callable[[str, str], Path]) -> None:
    model = load_model(zoo_model(name, "legacy"))
    index = analyze(model)
    keep = random_valid_plan(index, np.random.default_rng(0), 0.5, 0.9)
    rng = np.random.default_rng(1)
    samples = [random_feeds(model, rng, batch=1) for _ in range(4)]
    data = from_iterable([(next(iter(feeds.values())), None) for feeds in samples])
    recovered, report = recover(model, apply_plan(model, index, keep), index, keep, data, method="lstsq",
                                ridge=1e-2, batch_size=1, refit_positions=16, intra_op_threads=2)
    onnx.checker.check_model(recovered, full_check=True)
    assert [(v.name, str(v.type)) for v in recovered.graph.output] == \
        [(v.name, str(v.type)) for v in apply_plan(model, index, keep).graph.output]
    refit = {c.node for c in report.consumers if c.alpha is not None}
    assert len(refit) >= 3, report.skipped
    assert_same_outputs(recovered_reference(model, recovered, index, keep, refit), recovered, samples[0],
                        rtol=1e-4, atol=1e-5)
