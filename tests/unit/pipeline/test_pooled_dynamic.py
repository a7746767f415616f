"""Grid-pooled calibration of a model that keeps dynamic spatial dims (prepared with ``input_shapes``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graph_ops.probes import add_pooled_probes, expose_tensors
from graph_ops.proto import declared_shapes
from pipeline.data.datasets import from_iterable
from pipeline.prune.orchestrate import PruneRun
from tests.oracles import run_ort
from tests.unit.pipeline.test_dynamic_dims import ANALYSIS, paddle_classifier


def test_a_2x2_grid_is_pooled_at_the_prepared_sizes_and_equals_the_bin_means(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((30, *ANALYSIS[1:])).astype(np.float32)
    run = PruneRun(paddle_classifier(tmp_path / "cls.onnx"), from_iterable([(x, None)]), batch_size=10,
                   backend="ort-cpu", progress=False, input_shapes={"x": ANALYSIS}, pooling="avg2")
    model, index = run.prepared.model, run.prepared.index
    probe = next(p for g in index.groups if g.prunable and g.size == 16 for p in g.probes)
    assert None in declared_shapes(model)[probe]  # the prepared model keeps its dynamic width
    stats = run.stats()  # before: "2x2 pooling needs a static 4-D (N, C, H, W) probe"
    assert stats.probes[probe].dim == 16 * 4
    with pytest.raises(Exception, match="static 4-D"):
        add_pooled_probes(model, [probe], bins=2)
    pooled, (info,) = add_pooled_probes(model, [probe], bins=2, sizes=index.shapes)
    names = [o.name for o in pooled.graph.output]
    sums = run_ort(pooled, {"x": x[:1]})[names.index(info.sums)][0]  # (C, 2, 2) bin sums
    h, w = index.shapes[probe][2:]
    full = run_ort(expose_tensors(model, [probe]), {"x": x[:1]})[-1][0]
    want = np.array([[full[:, i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2].sum(axis=(1, 2))
                      for j in range(2)] for i in range(2)]).transpose(2, 0, 1)  # (C, row bin, column bin)
    np.testing.assert_allclose(sums, want, rtol=1e-4, atol=1e-4)
