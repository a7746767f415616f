"""Batches cut into onnxruntime calls of fewer samples (pipeline.model.runtime.samples_per_run / run(per_run=...)): same
values as one call, for calibration, evaluation and recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.calibration.calibrate import calibrate
from pipeline.data.datasets import from_iterable
from pipeline.model.prepare import prepare
from pipeline.model.runtime import open_session, run, samples_per_run
from pipeline.recovery import recover
from tests.graphs import tiny_classifier


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    y = np.arange(n) % 10
    return from_iterable([({"input": x[i:i + 64]}, y[i:i + 64]) for i in range(0, n, 64)], name="synthetic")


@pytest.fixture
def model(tmp_path: Path) -> str:
    return tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10)


def test_samples_per_run_follows_the_widest_activation(model: str) -> None:
    prepared = prepare(model)
    # widest activation: r2, 16 x 8 x 8 floats = 4 KiB per sample; 4 alive -> 16 KiB per sample
    assert samples_per_run(prepared.model, 64) == 64
    assert samples_per_run(prepared.model, 64, budget=16 << 10) == 1
    assert samples_per_run(prepared.model, 64, budget=20 * (16 << 10)) == 16  # at most 20: 4 calls of 16
    assert samples_per_run(prepared.model, 64, budget=40 * (16 << 10)) == 32


def test_static_batch_runs_whole_batches(tmp_path: Path) -> None:
    path = tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10)
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    assert samples_per_run(model, 4, budget=1) == 4


def test_sliced_run_equals_one_call(model: str) -> None:
    session = open_session(model, "ort-cpu", 1)
    x = np.random.default_rng(1).standard_normal((50, 3, 8, 8)).astype(np.float32)
    whole = run(session, None, {"input": x}, stage="test")
    for per_run in (1, 7, 16, 49):
        sliced = run(session, None, {"input": x}, stage="test", per_run=per_run)
        np.testing.assert_array_equal(sliced[0], whole[0])


def test_outputs_that_are_not_per_sample_run_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the output sums over the batch: slices would give partial sums, so the batch runs in one call
    node = helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = open_session(model.SerializeToString(), "ort-cpu", 1)
    x = np.ones((10, 3), np.float32)
    assert float(run(session, None, {"x": x}, stage="test", per_run=3)[0]) == 30.0
    # found once: the next batches of this session run whole without trying slices first
    import pipeline.model.runtime

    tried = []
    monkeypatch.setattr(pipeline.model.runtime, "_run_sliced", lambda *args: tried.append(args) or None)
    assert float(run(session, None, {"x": 2 * x}, stage="test", per_run=3)[0]) == 60.0
    assert tried == []


def test_calibration_and_recovery_do_not_depend_on_the_call_size(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from graph_ops.prune import apply_plan

    prepared = prepare(model)
    keep = {g.id: list(range(0, g.size, 2)) for g in prepared.index.groups if g.prunable}

    def pipeline_run() -> tuple:
        stats = calibrate(prepared, _data(300), progress=False, intra_op_threads=1)
        pruned = apply_plan(prepared.model, prepared.index, keep)
        recovered, _ = recover(prepared.model, pruned, prepared.index, keep, _data(300, seed=2), method="lstsq",
                               intra_op_threads=1)
        return stats, recovered

    stats, recovered = pipeline_run()
    import pipeline.calibration.calibrate
    import pipeline.model.runtime
    import pipeline.recovery.sweep

    monkeypatch.setattr(pipeline.calibration.calibrate, "samples_per_run", lambda model, batch, **kw: 5)
    monkeypatch.setattr(pipeline.recovery.sweep, "samples_for", lambda shapes, batch: 5)
    sliced = []
    original = pipeline.model.runtime._run_sliced

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        sliced.append(args[4] if result is not None else "whole")  # "whole": fell back to one call
        return result

    monkeypatch.setattr(pipeline.model.runtime, "_run_sliced", counted)
    stats5, recovered5 = pipeline_run()
    # calibration's 5 batches, the original model's 5 batches in the recovery sweep and the 5 batches of every step
    # of the current model ran in slices (none fell back to a whole call)
    assert set(sliced) == {5} and len(sliced) > 10 and len(sliced) % 5 == 0
    for name, probe in stats.probes.items():
        np.testing.assert_array_equal(stats5.probes[name].gram, probe.gram)
        np.testing.assert_array_equal(stats5.probes[name].class_sums, probe.class_sums)
    for a, b in zip(recovered.graph.initializer, recovered5.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
