"""Channels on the last axis (a transformer's or a channels-last ConvNeXt block's MLP): calibration pools them over
every other axis, and the default job (DI, lstsq) prunes the hidden features exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.probes import expose_tensors
from pipeline.data.datasets import from_iterable
from pipeline.prune.orchestrate import PruneRun, keep_lists
from tests.graphs_refine import channels_last_mlp, token_mlp
from tests.oracles import assert_same_outputs, recovered_reference, run_ort


@pytest.mark.parametrize("motif", [token_mlp, channels_last_mlp], ids=["tokens", "channels-last"])
def test_last_axis_mlp_is_calibrated_pruned_and_recovered(motif: object, tmp_path: Path) -> None:
    model, _ = motif()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 1, 3, 8, 8)).astype(np.float32)
    labels = np.arange(90) % 3
    run = PruneRun(path, from_iterable([(x[i], labels[i:i + 1]) for i in range(90)], name="gaussian"),
                   batch_size=1, progress=False)
    index = run.prepared.index
    (group,) = [g for g in index.groups if g.prunable]
    (probe,) = group.probes
    assert probe in index.last_axis
    hidden = np.concatenate([run_ort(expose_tensors(run.prepared.model, [probe]), {"x": xi})[-1] for xi in x])
    want = hidden.reshape(90, -1, hidden.shape[-1]).astype(np.float64).mean(axis=1)  # over tokens / positions
    stats = run.stats().probes[probe]
    np.testing.assert_allclose(stats.mean(), want.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.scatter(), (want - want.mean(0)).T @ (want - want.mean(0)), rtol=1e-4,
                               atol=1e-7)
    plan = run.plan(run.scores("di"), target_macs=0.7)
    keep = keep_lists(plan)
    assert set(keep) == {group.id} and len(keep[group.id]) < group.size
    pruned = run.apply(plan)
    recovered, report = run.recover(pruned, plan, "lstsq")
    onnx.checker.check_model(recovered, full_check=True)
    refit = {c["node"] for c in report["consumers"] if c.get("alpha") is not None}
    assert refit and not report["skipped"], report
    reference = recovered_reference(run.prepared.model, recovered, index, keep, refit)
    for xi in x[:3]:
        assert_same_outputs(reference, recovered, {"x": xi}, rtol=1e-4, atol=1e-5)


def test_tokens_folded_into_the_batch_axis_stay_frozen() -> None:
    """Patches folded into axis 0 (MobileViT's unfold: [N * P, tokens, C]) are not one sample per row, so a Linear
    there makes no last-axis group (calibration could not pool per sample); its MACs still count."""
    from graph_ops.channels import analyze
    from graph_ops.cost import count
    from tests.graphs import Net

    n = Net(5)
    y = n.op("Relu", [n.conv("x", 3, 8)])  # [1, 8, 8, 8]
    folded = n.op("Reshape", [n.op("Transpose", [y], perm=[0, 2, 3, 1]), n.const(np.array([4, 16, 8], np.int64))])
    hidden = n.op("Relu", [n.op("MatMul", [folded, n.rand(8, 12)])])
    out = n.op("MatMul", [hidden, n.rand(12, 8)])
    model = n.model(n.op("ReduceMean", [out], axes=[0, 1], keepdims=0))
    index = analyze(model)
    assert not index.last_axis and not any(g.prunable and g.size == 12 for g in index.groups)
    assert index.predict()[0] == count(model).macs
