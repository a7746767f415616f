"""Issue 26: production exports as shipped. A ``-1`` dim is dynamic; ``--input-shape`` sizes analysis, cost and
calibration data only; the pruned model keeps the file's dynamic dims (run at two batch sizes and two widths against
the mask oracle); calibration and recovery feed whole batches whatever the analysis batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pipeline.model.runtime
from graph_ops.dynamic_dims import shapes_at, symbolic_dims, with_io_dims
from graph_ops.errors import UserInputError
from graph_ops.mask import zero_channels
from graph_ops.proto import declared_shapes, set_input_dims
from pipeline.cli import main
from pipeline.data.datasets import from_iterable
from pipeline.model.prepare import prepare
from pipeline.prune.orchestrate import PruneRun, keep_lists
from pipeline.selection.plan import PruningPlan
from tests.graphs import Net
from tests.oracles import assert_same_outputs, run_ort

ANALYSIS = (1, 3, 8, 16)


def _ints(n: Net, *values: int) -> str:
    return n.const(np.array(values, np.int64))


def paddle_classifier(path: Path) -> Path:
    """A Paddle2ONNX-style classifier: input ``[-1, 3, 8, -1]`` (batch and width written as ``-1``), an explicit
    ``Pad`` before an unpadded stride-2 conv, GAP, a flattening ``Reshape(Concat(Shape(x)[0:1], [-1]))``, MatMul +
    Add, Softmax; output ``[-1, 4]``."""
    n = Net(80)
    y = n.op("Relu", [n.conv("x", 3, 16)])
    y = n.op("Pad", [y, _ints(n, 0, 0, 1, 1, 0, 0, 1, 1)])
    w = n.rand(24, 16, 3, 3, scale=0.15)
    y = n.op("Relu", [n.op("Conv", [y, w, n.rand(24, scale=0.1)], kernel_shape=[3, 3], strides=[2, 2])])
    y = n.op("Relu", [n.conv(y, 24, 24, k=1)])
    pooled = n.op("GlobalAveragePool", [y])
    batch = n.op("Slice", [n.op("Shape", [pooled]), _ints(n, 0), _ints(n, 1), _ints(n, 0)])
    flat = n.op("Reshape", [pooled, n.op("Concat", [batch, _ints(n, -1)], axis=0)])
    logits = n.op("Add", [n.op("MatMul", [flat, n.rand(24, 4)]), n.rand(4, scale=0.1)])
    probs = n.op("Softmax", [logits], axis=1)
    graph = helper.make_graph(n.nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [-1, 3, 8, -1])],
                              [helper.make_tensor_value_info(probs, TensorProto.FLOAT, [-1, 4])], n.inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7), str(path))
    return path


@pytest.fixture
def paddle(tmp_path: Path) -> Path:
    return paddle_classifier(tmp_path / "cls.onnx")


def _dims(info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


def test_negative_dims_are_dynamic(paddle: Path) -> None:
    model = onnx.load(str(paddle))
    assert declared_shapes(model)["x"] == (None, 3, 8, None)
    set_input_dims(model, {"x": (2, 3, 8, 40)})  # a -1 takes any size; a static dim must match
    with pytest.raises(UserInputError, match="dim 1 is fixed to 3"):
        set_input_dims(onnx.load(str(paddle)), {"x": (1, 4, 8, 16)})
    symbolic = symbolic_dims(onnx.load(str(paddle)))
    assert _dims(symbolic.graph.input[0]) == ["x_dim0", 3, 8, "x_dim3"]
    restored = with_io_dims(symbolic, onnx.load(str(paddle)).graph.input)
    assert _dims(restored.graph.input[0]) == [-1, 3, 8, -1]


def test_shapes_at_sizes_every_tensor_without_changing_the_model(paddle: Path) -> None:
    prepared = prepare(paddle)
    before = prepared.model.SerializeToString()
    shapes = shapes_at(prepared.model, {"x": ANALYSIS})
    assert prepared.model.SerializeToString() == before
    conv = next(n for n in prepared.model.graph.node if n.op_type == "Conv" and n.input[0].startswith("pad"))
    assert shapes[conv.output[0]] == (1, 24, 4, 8)
    assert prepared.index.unknown_macs  # without the sizes, the width is dynamic


def test_prepared_model_keeps_dynamic_dims_and_analysis_uses_the_given_size(paddle: Path) -> None:
    prepared = prepare(paddle, {"x": ANALYSIS})
    assert _dims(prepared.model.graph.input[0])[1:3] == [3, 8]
    assert all(isinstance(d, str) for d in np.array(_dims(prepared.model.graph.input[0]))[[0, 3]])
    assert prepared.input_specs["x"][0] == (None, 3, 8, 16)  # data at the analysis size, any batch
    assert not prepared.index.unknown_macs and prepared.cost.macs > 0
    assert all(g.prunable for g in prepared.index.groups if g.size in (16, 24))  # Pad and flatten head are exact


def test_prune_with_input_shape_and_macs_budget_keeps_dynamic_dims(paddle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((24, *ANALYSIS[1:])).astype(np.float32))
    out = tmp_path / "pruned.onnx"
    assert main(["-q", "prune", str(paddle), "--input-shape", "x:1x3x8x16", "--data", str(data), "--method", "l2",
                 "--target-macs", "0.5", "--round-to", "4", "--min-channels", "4", "--recover", "none",
                 "-o", str(out)]) == 0
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(str(paddle))
    assert [_dims(i) for i in (*pruned.graph.input, *pruned.graph.output)] == [
        _dims(i) for i in (*original.graph.input, *original.graph.output)]  # [-1, 3, 8, -1] and [-1, 4]
    activations = [info.type.tensor_type.shape.dim for info in pruned.graph.value_info
                   if len(info.type.tensor_type.shape.dim) >= 2]
    assert activations and not any(dims[0].dim_value > 0 for dims in activations)  # no value_info pins the batch
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["pruned"]["macs"] / report["original"]["macs"] <= 0.5
    prepared = prepare(paddle, {"x": ANALYSIS})
    masked = zero_channels(prepared.model, prepared.index, keep_lists(PruningPlan.load(f"{out}.plan.json")))
    rng = np.random.default_rng(1)
    for batch, width in ((1, 16), (3, 16), (1, 40), (4, 24)):
        feeds = {"x": rng.standard_normal((batch, 3, 8, width)).astype(np.float32)}
        assert_same_outputs(masked, pruned, feeds, rtol=1e-4)
        assert run_ort(pruned, feeds)[0].shape == (batch, 4)


def test_apply_keeps_the_files_dims(paddle: Path, tmp_path: Path) -> None:
    scores, plan, out = tmp_path / "scores.json", tmp_path / "plan.json", tmp_path / "pruned.onnx"
    shape = ["--input-shape", "x:1x3x8x16"]
    assert main(["-q", "score", "--model", str(paddle), "--method", "l2", *shape, "-o", str(scores)]) == 0
    assert main(["-q", "plan", str(scores), "--model", str(paddle), "--target-macs", "0.6", "--round-to", "4",
                 "--min-channels", "4", *shape, "-o", str(plan)]) == 0
    assert main(["-q", "apply", str(paddle), str(plan), "-o", str(out)]) == 0
    assert _dims(onnx.load(str(out)).graph.input[0]) == [-1, 3, 8, -1]


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of samples of every onnxruntime call of calibration, evaluation and recovery."""
    seen: list[int] = []
    call = pipeline.model.runtime._call

    def counting(session: object, names: object, feeds: dict[str, np.ndarray], stage: str) -> list[np.ndarray]:
        seen.append(len(next(iter(feeds.values()))))
        return call(session, names, feeds, stage)

    monkeypatch.setattr(pipeline.model.runtime, "_call", counting)
    return seen


def test_calibration_and_recovery_of_a_dynamic_batch_run_batched(paddle: Path, batch_sizes: list[int]) -> None:
    x = np.random.default_rng(2).standard_normal((40, *ANALYSIS[1:])).astype(np.float32)
    data = from_iterable([(x[i:i + 20], None) for i in range(0, 40, 20)], name="gaussian")
    run = PruneRun(paddle, data, batch_size=20, backend="ort-cpu", progress=False, input_shapes={"x": ANALYSIS})
    run.stats()
    assert batch_sizes == [20, 20]  # the analysis batch (1) does not cut the batches
    plan = run.plan(run.scores("l2"), target_macs=0.6, round_to=4, min_channels=4)
    batch_sizes.clear()
    model, recovery = run.recover(run.apply(plan), plan, "lstsq")
    assert recovery["consumers"] and batch_sizes and set(batch_sizes) == {20}
    assert _dims(model.graph.input[0]) == [-1, 3, 8, -1]


def test_a_static_batch_still_runs_one_sample_per_call(tmp_path: Path, batch_sizes: list[int]) -> None:
    model = onnx.load(str(paddle_classifier(tmp_path / "cls.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a model exported for batch 1 only
    onnx.save(model, str(tmp_path / "static.onnx"))
    x = np.random.default_rng(2).standard_normal((6, *ANALYSIS[1:])).astype(np.float32)
    run = PruneRun(tmp_path / "static.onnx", from_iterable([(x, None)]), batch_size=6, backend="ort-cpu",
                   progress=False, input_shapes={"x": ANALYSIS})
    run.stats()
    assert batch_sizes == [1] * 6


def test_data_at_another_size_than_the_analysis_is_refused(paddle: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Calibration and recovery data must have the sizes analysis used (the model itself would take any width)."""
    data = tmp_path / "wide.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 8, 24)).astype(np.float32))
    for method in ("l2", "di"):  # l2: recovery only reads the data; di: calibration first
        args = ["-q", "prune", str(paddle), "--input-shape", "x:1x3x8x16", "--data", str(data), "--method", method,
                "--target-macs", "0.6", "--round-to", "4", "--min-channels", "4", "-o", str(tmp_path / "out.onnx")]
        if method == "di":
            np.savez(data, x=np.load(data)["x"], y=np.arange(8) % 2)
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("diprune: error:") and "[N, 3, 8, 16]" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.onnx").exists()



def test_batch_one_sizes_a_dynamic_batch_only_where_declared_sizes_are_missing() -> None:
    """``prepare`` folds shape chains at batch 1 (``PreparedModel.sizes``) for a model whose only dynamic dim is
    the batch when its declared shapes leave a Conv's size unknown (a ShuffleNet or TF-padding export, checked in
    the zoo); the declared shapes suffice otherwise, and a dynamic width needs ``--input-shape``."""
    from pipeline.model.prepare import batch_one
    from tests.graphs_export import explicit_pad

    model, _ = explicit_pad()
    assert batch_one(model) == {}  # inferred shapes cover every Conv
    del model.graph.value_info[:]
    assert batch_one(model) == {"x": (1, 3, 8, 8)}
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    assert batch_one(model) == {}


def test_latency_runs_the_dynamic_models_at_the_prepared_sizes(paddle: Path) -> None:
    """The latency benchmarks need static sizes besides the batch: the prepared sizes (``at_sizes``, or
    ``input_shapes`` of the interleaved rounds), while the model itself stays dynamic."""
    from pipeline.deployment.timing import interleaved_ratios
    from pipeline.errors import UserInputError as PipelineInputError

    prepared = prepare(paddle, {"x": ANALYSIS})
    quick = {"rounds": 1, "min_iters": 1, "round_seconds": 0.01, "warmup_s": 0.01}
    dynamic = prepared.model.SerializeToString()
    with pytest.raises(PipelineInputError, match="--input-shape"):
        interleaved_ratios([dynamic], **quick)
    assert len(interleaved_ratios([prepared.at_sizes(prepared.model)], batch=2, **quick).ratios) == 1
    assert len(interleaved_ratios([dynamic], input_shapes={"x": ANALYSIS}, **quick).ratios) == 1
    assert _dims(prepared.model.graph.input[0])[3] == "x_dim3"
